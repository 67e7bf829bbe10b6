"""The target side of a live migration, one per incoming peer connection.

The VM is created under the same rules R1/R2 as any other, its pages applied as they come, its
state restored once all memory is in place (R9), verified, and resumed only on COMMIT (DESIGN
section 5). Before LOADED any failure discards the copy. After LOADED, a lost link leaves the copy
paused: asked again, this side aborts for good (it never got COMMIT) and says so.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from transport.datastream import DataHello, Layout
from transport import (
    Accept,
    Commit,
    DeviceState,
    Done,
    Event,
    Loaded,
    PageBatch,
    Progress,
    Query,
    RemoteProtocolError,
    Role,
    Running,
    VmDescription,
)

from .. import faults, tls
from ..hosted import HostedVm, SpecError, VmSpec, VmState, create_incoming, vm_config
from ..kvm.arch import guest_memory, host_arch
from ..kvm.errors import KvmError, KvmIoctlError
from ..kvm.memory import GuestMemory
from ..kvm.vm import VmConfig, validate_config
from ..logs import get_logger
from ..pagehash import memory_digest
from ..peer import FINAL_PAGES_ON_CONTROL, FLAT_MACHINE_STATE, PeerAborted, PeerChannel, PeerError, make_connection
from . import vmstate
from .host import MigrationHost
from .idlelinks import is_idle_link, wait_on_idle_link
from .background_record import BackgroundRecord
from .incoming_check import Refused, check_description
from .pagestream import PAGE_SIZE, apply_batch
from .prefault import Prefaulter
from .recvstreams import ReceiveStreams
from .source_exchanges import answer_query, take_source_timing
from .stats import MigrationStats, StepTimes
from .timeline import Timeline
from .earlydigest import EarlyDigest
from .window import STATE_WORK_ON_LOOP_MAX_VCPUS, DowntimeWindow


class DataStreamUnused(Exception):
    """A data stream that proved it is its migration's and waited, and the migration ended (it
    failed, or its idle link closed) before the stream was used: no fault of the stream's."""


class Target:
    def __init__(
        self, daemon: MigrationHost, stream: trio.SocketStream, peer: str, setup_deadline: float | None = None
    ) -> None:
        self.daemon = daemon
        self._setup_deadline = setup_deadline
        self.peer = peer
        self._raw = stream
        self.channel = PeerChannel(
            stream,
            make_connection(Role.TARGET, daemon.config.peer, daemon.node, daemon.config.migration.max_batch_bytes),
            io_timeout_s=daemon.config.peer.connect_timeout_s,
        )
        self.log = get_logger(component="target", peer=peer)
        self.hosted: HostedVm | None = None
        self.stats: MigrationStats | None = None
        self.loaded = False
        self.committed = False
        self.run_state = "running"
        self.memory_backing: str | None = None  # the source's operator's choice for this copy, if any
        self._source_cpuid: tuple[bytes, ...] = ()  # the vCPUs' CPUID, from the description
        self._source_allocated: int | None = None  # the RAM the source's file holds, from the description
        self.reserved_name: str | None = None
        self.admitted_id: str | None = None  # counted in daemon.incoming until the connection ends
        self.scope = trio.CancelScope()  # cancelled when a query aborts this copy for good
        self.abort_reason = ""
        self.finished = trio.Event()  # set once this connection's outcome is recorded
        self.data_streams = 0  # data connections the source announced (0: pages on this one)
        self._streams: ReceiveStreams | None = None
        # Set once the VM's RAM exists and its streams can take connections, or the migration
        # ended: the source connects its data streams while this side makes the RAM.
        self._streams_ready = trio.Event()
        self._streams_waiting = 0
        self._all_streams_waiting = trio.Event()  # fault target-build-after-streams
        self._stream_bytes = 0  # what the data streams carried, once they all ended
        self._receive_scope = trio.CancelScope()  # cancelled when a data stream fails
        self._started = time.monotonic()
        self._phase_steps = StepTimes({})
        self._prefault: list[Prefaulter] = []
        self._ram: GuestMemory | None = None  # made before ACCEPT, until the VM built around it owns it
        # From the first device state (the source paused) to RUNNING: the collector off, the
        # threads at SCHED_FIFO (window.py).
        self._window = DowntimeWindow(
            realtime=daemon.config.migration.downtime_realtime,
            idle_polling=daemon.config.migration.downtime_idle_polling,
        )
        self._timeline = Timeline()  # the cutover's fine marks, restarted by `_start_cutover_timeline`
        self._cutover_timeline_started = False
        self._streams_end_marked = False  # by `report_end`, where the streams' end was reported
        self._setup_timeline = Timeline()  # the setup's fine marks, from the connection taken up
        self._rehearsal_ms: float | None = None  # `_rehearse_restore`, when it ran
        self._restore_steps_ms: dict[str, float] = {}  # the state restore's steps, for the cutover's log
        self._state_kind: str | None = None  # the machine state's form, for the same log
        self._streams_counted = False  # `_streams_ended` added the streams' totals to the stats
        self._end_reported = trio.Event()  # the streams' end reported to the source (Progress)
        self._verify_expected: str | None = None  # the description's verify (None: an older source)
        self._early_digest: EarlyDigest | None = None  # started once every page is in (verify full)
        self._tasks: trio.Nursery | None = None  # the receive's nursery, for the early digest
        self.idle_link = False  # a source's warm link: it may wait idle, its streams come early
        self._record = BackgroundRecord(lambda: None, lambda ms: None)  # `_start_record`'s

    async def run(self) -> None:
        try:
            with self.scope:
                await self._run()
            if self.scope.cancelled_caught:
                self.log.warning("incoming_aborted_for_good", reason=self.abort_reason)
                await self._on_failure(self.abort_reason)
        finally:
            self._window.close()  # idempotent; lowers the loop where `_receive_vm` did not get to
            if self.reserved_name is not None:
                self.daemon.release_name(self.reserved_name)
            if self.admitted_id is not None:
                self.daemon.incoming.leave(self.admitted_id)
            self.daemon.finish_incoming(self)
            self.daemon.idle_links.forget(self)  # its warm streams find it no more
            self._streams_ready.set()  # a data stream still waiting is refused now
            await self._close_streams()
            self._close_ram()
            await self.channel.aclose()
            self.daemon.vm_shell.refill()  # after this migration's own work (vmshell.py)
            self.finished.set()

    async def _run(self) -> None:
        peer_config = self.daemon.config.peer
        try:
            # Phase "setup": authentication and the first message, under one deadline, so a
            # peer that trickles its handshake gets no more time than one that stalls.
            deadline = self._setup_deadline
            if deadline is None:
                deadline = trio.current_time() + peer_config.connect_timeout_s
            with trio.fail_at(deadline):
                if peer_config.auth == "tls":
                    try:
                        self.channel.stream = await tls.wrap_server(self._raw, peer_config)
                    except (ssl.SSLError, trio.BrokenResourceError) as err:
                        raise PeerError(f"TLS handshake failed: {err}") from err
                await self.channel.handshake(mark=self._setup_timeline.mark)
                self._phase_steps.step("handshake")
                idle = self.idle_link = is_idle_link(self.channel)
                first: Event | None = None if idle else await self.channel.receive()
            if idle:
                # A source's warm link: it waits for its first message under its own deadline.
                first = await wait_on_idle_link(
                    self, self.daemon.idle_links, self.daemon.config, len(self.daemon.incoming)
                )
                if first is None:
                    return
            self._phase_steps.step("describe")
            self._setup_timeline.mark("described")
            if isinstance(first, Query):
                await answer_query(self.daemon, self.channel, self.log, first)
            elif isinstance(first, VmDescription):
                await self._receive_vm(first)
            else:
                raise PeerError(f"expected VmDescription or Query, got {type(first).__name__}")
        except trio.TooSlowError:
            message = (
                f"the handshake and the first message did not arrive within {peer_config.connect_timeout_s:g} s "
                "(peer.connect_timeout_s)"
            )
            self.log.warning("incoming_connection_failed", error=message)
            await self._on_failure(message)
        except PeerAborted as err:
            # The source said so, over the authenticated stream (DESIGN 6): it never sends COMMIT
            # now and runs the VM itself, so even a loaded copy has nothing left to wait for.
            self.log.warning("incoming_migration_aborted_by_source", error=str(err))
            await self._on_failure(f"the source aborted: {err}")
        except (PeerError, OSError) as err:
            self.log.warning("incoming_connection_failed", error=str(err) or type(err).__name__)
            await self._on_failure(str(err) or type(err).__name__)
        except Refused as err:
            self.log.warning("incoming_vm_refused", error=str(err))
            await self.channel.abort(str(err))
            await self._discard(str(err))
        except Exception as err:
            self.log.exception("incoming_migration_crashed")
            await self.channel.abort(f"target error: {err}")
            await self._on_failure(f"target error: {err}")

    def restart_clocks(self) -> None:
        """An idle link's first message came: the migration starts now, not at the connect."""
        self._started = time.monotonic()
        self._phase_steps = StepTimes({})
        self._setup_timeline = Timeline()

    async def _next(self) -> Any:
        """The peer's next event within peer.message_timeout_s: the deadline of every phase
        after setup. The link's own timeout restarts with each byte; this one does not, so a
        peer that trickles a byte every few seconds is cut off too."""
        timeout = self.daemon.config.peer.message_timeout_s
        try:
            with trio.fail_after(timeout):
                return await self.channel.receive()
        except trio.TooSlowError:
            raise PeerError(
                f"no complete message from the peer within {timeout:g} s (peer.message_timeout_s)"
            ) from None

    def _check(self, description: VmDescription) -> VmSpec:
        checked = check_description(description, self.daemon)
        spec = checked.spec
        self.memory_backing, self.run_state, self.data_streams = (
            checked.memory_backing,
            checked.run_state,
            checked.streams,
        )
        self._source_cpuid = checked.cpuid
        self._source_allocated = checked.allocated_bytes
        limits = self.daemon.config.migration
        try:
            self.daemon.incoming.admit(
                description.migration_id, self, spec.memory_bytes, limits.max_incoming, limits.max_incoming_memory_bytes
            )
        except ValueError as err:
            raise Refused(str(err)) from None
        self.admitted_id = description.migration_id
        # Last, and with no await since the check: the name is ours until the VM exists or
        # this connection ends (`run`'s finally), and a second source of the same name is
        # refused before anything of its VM is allocated.
        if not self.daemon.reserve_name(spec.name):
            raise Refused(f"a VM named {spec.name!r} already exists on this daemon")
        self.reserved_name = spec.name
        return spec

    async def _receive_vm(self, description: VmDescription) -> None:
        started = time.monotonic()
        # From the description on, as the source's for its setup (window.py); kept for the
        # whole migration where the pages come on data streams (below), else lowered there.
        self._window.raise_event_loop()
        spec = self._check(description)
        self._verify_expected = description.verify
        self.stats = stats = MigrationStats(
            migration_id=description.migration_id, vm=spec.name, role="target", peer=self.peer
        )
        stats.phase_steps_ms = self._phase_steps.steps
        self._phase_steps.step("check")
        mark = self._setup_timeline.mark
        mark("checked")
        self.log = self.log.bind(vm=spec.name, migration_id=description.migration_id)
        defaults = self.daemon.config.vm
        if self.data_streams and faults.active("target-build-after-streams"):
            with trio.move_on_after(self.daemon.config.peer.connect_timeout_s):
                await self._all_streams_waiting.wait()
        try:
            # This daemon's backing unless the source's operator named one (`migrate
            # --target-memory-backing`): where RAM lives is the host's business, not the VM's.
            backing = self.daemon.memory_backing(self.memory_backing or defaults.memory_backing)
            if backing.reserve is not None and self._source_allocated is not None:
                # A kept file fits if its pages are about what the source's RAM holds (ramreserve.py).
                backing = dataclasses.replace(backing, reserve=backing.reserve.reserve.claim(self._source_allocated))
            config = vm_config(
                spec, defaults.dirty_tracking, defaults.ring_bytes, defaults.harvest_interval_ms, backing
            )
            # Built with the source's CPUID: the restore then finds it set (x86 fixed.py).
            config = dataclasses.replace(config, cpuid=self._source_cpuid)
            # Everything the build would refuse for this host's KVM, refused before ACCEPT.
            validate_config(config, self.daemon.kvm.caps(), host_arch(self.daemon.kvm.caps().arch))
            # Before ACCEPT only the RAM the pages go into (DESIGN 4): the VM itself (KVM_CREATE_VM,
            # the ring, the memslot, the vCPUs: 1 ms for 150 MiB and 1 vCPU here, 25 ms for
            # 64 GiB) is built after it, beside the bulk copy (`_build_and_register`). RAM that
            # takes its pages at creation (hugetlbfs) is made off the loop.
            if backing.kind == "hugetlbfs":
                self._ram = await trio.to_thread.run_sync(guest_memory, self.daemon.kvm, config)
            else:
                self._ram = guest_memory(self.daemon.kvm, config)
            self._phase_steps.step("create_ram")
            mark("ram_created")
        except (KvmError, SpecError, ValueError) as err:
            raise Refused(f"cannot create VM {spec.name} here: {err}") from None
        stats.memory_backing = config.memory_backing.kind
        stats.ram_from_reserve = self._ram.from_reserve
        if self.data_streams:
            self._open_streams(self._ram)
            # The event loop only coordinates while the pages come on the data streams: raised
            # on, its wake-up for the state (the downtime's first on this side) does not wait
            # for a core behind the host's other work (window.py).
        else:
            self._window.lower_event_loop()  # the pages come through this loop
        self._streams_ready.set()
        # Accept before the VM is built and its record (fsync'd) written: the source starts its
        # bulk copy meanwhile. Until registered, a failure discards the copy all the same
        # (`_discard`), and the reserved name keeps another VM from taking it.
        await self.channel.send(Accept())
        self._phase_steps.step("accept")
        mark("accept_sent")
        self.hosted = await self._build_and_register(spec, config)
        self._phase_steps.step("build_and_register")
        mark("registered")
        # What this copy tracks with, resolved ("ring", not "auto"), as the source reports its own.
        stats.dirty_tracking = self.hosted.vm.dirty_tracking if self.hosted.vm is not None else config.dirty_tracking
        self.log.info(
            "setup_timeline",
            origin=self._setup_timeline.origin,
            marks_ms=self._setup_timeline.as_ms(),
            link="warm" if self.idle_link else "fresh",  # as the source names its side
        )
        self.reserved_name = None  # the name is the VM's now; releasing it later could free another's claim
        stats.setup_ms = (time.monotonic() - started) * 1e3
        self.log.info(
            "incoming_vm_accepted",
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            memory_backing=config.memory_backing.kind,
            ram_from_reserve=stats.ram_from_reserve,
            vm_shell=stats.vm_shell,
        )
        vm = self.hosted.vm
        assert vm is not None and vm.memory is not None
        views = {r.slot: vm.memory.view(r).reshape(-1, PAGE_SIZE) for r in vm.memory.regions}
        # With data streams the bulk copy is written with pwrite, which takes no fault: nothing
        # to populate ahead, and no thread competing for the cores.
        prefault = (
            {}
            if self.data_streams
            else {r.slot: Prefaulter(vm.memory.host_address(r), r.size) for r in vm.memory.regions}
        )
        self._prefault = list(prefault.values())
        timeout = self.daemon.config.migration.timeout_s
        try:
            try:
                with trio.fail_after(timeout), self._receive_scope:
                    await self._receive(stats, views, prefault)
                self._phase_steps.step("receive_to_loaded")
            except trio.TooSlowError:
                raise PeerError(f"the VM did not arrive within {timeout:g} s (migration.timeout_s)") from None
            if self._receive_scope.cancelled_caught:
                assert self._streams is not None
                raise PeerError(self._streams.error or "a data stream failed")
            await self._await_commit()
        finally:
            self._window.close()
            # Joined only now, off the downtime (`_load` told them to stop), and before a
            # discard unmaps the memory they populate.
            for prefaulter in prefault.values():
                prefaulter.stop()

    async def _build_and_register(self, spec: VmSpec, config: VmConfig) -> HostedVm:
        """The VM around the RAM the pages already go into (R1/R2), from the daemon's warm
        shell where it fits (vmshell.py), in a worker; then its threads (vCPUs parked, the
        harvester), in a worker, while the loop attaches the data streams: all done before any
        control event is read, so before anything loads or resumes the VM. Its record is not
        waited for here (`_start_record`). A build that fails after ACCEPT is a refusal all the
        same: the source is told and resumes (DESIGN 5)."""
        ram, mark, stats = self._ram, self._setup_timeline.mark, self.stats
        assert ram is not None and stats is not None
        kvm, console_log = self.daemon.kvm, self.daemon.console_log(spec)
        shell, stats.vm_shell = self.daemon.vm_shell.take(config)

        def build() -> HostedVm:
            mark("build_entered")
            if faults.active("target-build-fails"):
                if shell is not None:
                    shell.close()  # as a build that fails closes it
                raise KvmIoctlError("KVM_CREATE_VM (test fault target-build-fails)", OSError(errno.ENOMEM, "no memory"))
            hosted = create_incoming(kvm, spec, config, console_log, False, ram, shell)
            mark("vm_created")
            return hosted

        try:
            hosted = await trio.to_thread.run_sync(build)
        except (KvmError, SpecError, ValueError) as err:
            # The RAM is still ours (`Vm.create`): `_discard` frees it after the streams stopped.
            raise Refused(f"cannot create VM {spec.name} here: {err}") from None
        self.hosted, self._ram = hosted, None  # the VM's now
        vm = hosted.vm
        assert vm is not None
        self.daemon.register_incoming(hosted, self, record=False)
        self._start_record(hosted)

        def start_threads() -> None:
            vm.start(False)
            mark("threads_started")

        await trio.to_thread.run_sync(start_threads)
        return hosted

    def _start_record(self, hosted: HostedVm) -> None:
        """The VM's record, beside the receive: on disk before LOADED and before a discard
        removes it (`_record.wait`), but no longer before the first control read (DESIGN 5
        needs it from LOADED on: background_record.py)."""
        record, mark, steps = self.daemon.record_vm, self._setup_timeline.mark, self._phase_steps

        def write() -> None:
            record(hosted)  # an OSError is logged there: the VM is fine, only its record is not
            mark("recorded")

        def written(ms: float) -> None:
            steps.steps["overlapped.record"] = ms

        self._record = BackgroundRecord(write, written)
        self._record.start()

    def _open_streams(self, memory: GuestMemory) -> None:
        conn = self.channel.conn
        negotiated = conn.negotiated
        assert negotiated is not None
        layout = Layout({r.slot: r.pages for r in memory.regions}, PAGE_SIZE, negotiated.max_batch_bytes)
        self._streams = ReceiveStreams(
            self.data_streams,
            conn.data_stream_secret(),
            layout,
            sealed=negotiated.auth == "psk",
            memory=memory,
            io_timeout_s=self.daemon.config.peer.connect_timeout_s,
        )
        self._streams.on_failure = lambda message: self._receive_scope.cancel()

    async def attach_data_stream(self, hello: DataHello, sock: Any) -> None:
        """A data connection for this migration (service.py): RemoteProtocolError if it is not
        one this migration expects, or does not prove it came from this migration's source.
        One that comes while the RAM is being made waits for it (under the caller's deadline),
        once its token proved it is this migration's."""
        if not self._streams_ready.is_set():
            negotiated = self.channel.conn.negotiated
            # An idle link's warm streams come before its description: as many as their hellos say.
            announced = self.data_streams or (hello.count if self.idle_link else 0)
            if negotiated is None or not announced:
                raise RemoteProtocolError(f"migration {hello.migration_id!r} takes no data streams now")
            hello.check_token(self.channel.conn.data_stream_secret())
            if self._streams_waiting >= announced:
                # Each waiting stream holds an fd until the RAM exists: no more than announced.
                raise RemoteProtocolError(f"more data streams than the {announced} announced")
            self._streams_waiting += 1
            if self._streams_waiting >= self.data_streams:
                self._all_streams_waiting.set()
            await self._streams_ready.wait()
            if self._streams is None:
                raise DataStreamUnused(f"migration {hello.migration_id!r} ended before its data stream was used")
        if self._streams is None:
            raise RemoteProtocolError(f"migration {hello.migration_id!r} takes no data streams now")
        self._streams.attach(hello, sock)

    async def _receive(self, stats: MigrationStats, views: dict[int, Any], prefault: dict[int, Prefaulter]) -> None:
        # The early digest's nursery (earlydigest.py): a failure cancels it and waits for its
        # thread before the RAM it reads is discarded.
        try:
            async with trio.open_nursery() as nursery:
                self._tasks = nursery
                await self._receive_with_tasks(stats, views, prefault)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._tasks = None

    async def _receive_with_tasks(
        self, stats: MigrationStats, views: dict[int, Any], prefault: dict[int, Prefaulter]
    ) -> None:
        if self._streams is None:
            await self._receive_events(stats, views, prefault, self._next)
            return
        # The pages come on the data streams: the control connection may rightly stay silent
        # for the whole bulk copy. The link counts as alive while any of them moves bytes.
        streams = self._streams
        silence_s = self.daemon.config.peer.connect_timeout_s
        self.channel.io_timeout_s = math.inf
        heard = [trio.current_time()]
        watching = [True]

        async def next_event() -> Any:
            event = await self.channel.receive()
            heard[0] = trio.current_time()
            if isinstance(event, Done):
                # From here every wait has its own deadline (the streams' end, the load, COMMIT).
                # The watch stops at its next wake-up, or when the receive's nursery ends: a
                # cancel here cost 0.05-0.07 ms of the downtime (bench/timeline.py).
                watching[0] = False
                self.channel.io_timeout_s = silence_s
            return event

        async def watch() -> None:
            moved = streams.arrived_bytes()
            while True:
                await trio.sleep(min(1.0, silence_s / 4))
                if not watching[0]:
                    return
                now, total = trio.current_time(), streams.arrived_bytes()
                if total != moved:
                    moved, heard[0] = total, now
                if now - heard[0] >= silence_s:
                    raise PeerError(f"nothing received from the peer for {silence_s:g} s (control and data streams)")

        async def report_end() -> None:
            # FINAL_PAGES_ON_CONTROL: a source that ended the streams before its pause waits for
            # this; one that did not skips it. The only waiter on the streams' end while it runs
            # (`wait_ended` wakes one waiter per change); a failed stream is `_streams_ended`'s.
            try:
                await streams.wait_ended()
            except RemoteProtocolError:
                self._end_reported.set()
                return
            # The source pauses as soon as this arrives: the window opens now (its threads raised,
            # idle CPUs polling), so that the state's arrival, the next wake-up, finds it open
            # and its cost (0.1-0.2 ms of syscalls) is spent before the pause, not after it.
            self._window.open()
            # The cutover's marks start here, where the source pauses on this report: the end is
            # marked when it was seen, not when an event of the downtime counts it (`_streams_ended`;
            # a downtime with no page on this connection counted it only at DONE).
            self._start_cutover_timeline()
            self._timeline.mark("streams_ended")
            self._streams_end_marked = True
            pages, zero_pages, nbytes, _ = streams.totals()
            await self.channel.send(
                Progress(bytes_received=nbytes, pages_received=pages + zero_pages, round=stats.round)
            )
            self._end_reported.set()
            await self._rehearse_restore()

        negotiated = self.channel.conn.negotiated
        if negotiated is None or FINAL_PAGES_ON_CONTROL not in negotiated.capabilities:
            self._end_reported.set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                if not self._end_reported.is_set():
                    nursery.start_soon(report_end)
                await self._receive_events(stats, views, prefault, next_event)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _receive_events(
        self,
        stats: MigrationStats,
        views: dict[int, Any],
        prefault: dict[int, Prefaulter],
        next_event: Callable[[], Awaitable[Any]],
    ) -> None:
        blobs: list[tuple[str, bytes]] = []
        bulk_entries = 0  # pages the bulk copy carried (data and zero); the rest it never touched
        round_entries = 0  # pages (data and zero) of the latest round: the last is the downtime's
        control_final_entries = 0  # pages (data and zero) of the final pass on this connection
        stats.state = stats.phase = "receiving"
        while True:
            event = await next_event()
            if isinstance(event, PageBatch):
                if self._streams is not None:
                    negotiated = self.channel.conn.negotiated
                    if negotiated is None or FINAL_PAGES_ON_CONTROL not in negotiated.capabilities or event.round == 0:
                        # A page on two paths could overtake its newer version on the other.
                        raise PeerError(
                            "PageBatch on the control connection of a migration with data streams "
                            "(only the final pass may come there, after every stream's end)"
                        )
                    # The final pass (FINAL_PAGES_ON_CONTROL): applied only once every stream
                    # ended and all it carried is in RAM, so nothing older lands after it.
                    self._start_cutover_timeline()
                    await self._streams_ended(stats)
                    control_final_entries += int(event.pages.size) + int(event.zero_pages.size)
                applied = time.perf_counter()
                apply_batch(views[event.slot], event, ram_is_fresh=event.round == 0)
                stats.apply_ms += (time.perf_counter() - applied) * 1e3
                if event.round == 0 and event.pages.size:
                    prefault[event.slot].advance((int(event.pages[-1]) + 1) * PAGE_SIZE, event.data_bytes)
                stats.pages_sent += int(event.pages.size)
                stats.zero_pages += int(event.zero_pages.size)
                stats.bytes_sent += event.data_bytes
                if event.round != stats.round:
                    round_entries = 0
                round_entries += int(event.pages.size) + int(event.zero_pages.size)
                stats.round = event.round
                if event.round == 0:
                    bulk_entries += int(event.pages.size) + int(event.zero_pages.size)
            elif isinstance(event, DeviceState):
                # Bounded before it is kept (DESIGN 6): each expected kind once, nothing else.
                if event.kind not in vmstate.KINDS or event.kind in (kind for kind, _ in blobs):
                    raise Refused(
                        f"device state {event.kind!r} unexpected (allowed once each: "
                        f"{', '.join(sorted(vmstate.KINDS))})"
                    )
                if not blobs:
                    self._start_cutover_timeline()
                    self._timeline.mark("state_received")
                    await self._state_arrived(stats)
                blobs.append((event.kind, event.blob))
                self._window.open()
            elif isinstance(event, Done):
                done_at = time.perf_counter()
                self._timeline.mark("done_received")
                if faults.active_once("target-stop-on-done"):
                    os.kill(os.getpid(), signal.SIGSTOP)  # resumes when the test sends SIGCONT
                streams = self._streams
                if streams is not None:
                    await self._streams_ended(stats)
                    bulk_entries = streams.entries_in_round(0)
                    if event.rounds is not None:
                        round_entries = streams.entries_in_round(event.rounds + 1) + control_final_entries
                        stats.round = event.rounds + 1 if round_entries else event.rounds
                if event.rounds is not None:
                    # The source's count: the downtime's final pass (round `rounds` + 1) is no
                    # dirty round.
                    stats.final_pages = round_entries if stats.round == event.rounds + 1 else 0
                    stats.round = event.rounds
                stats.untouched_pages = sum(views[slot].shape[0] for slot in views) - bulk_entries
                await self._record.wait()  # before LOADED (`_start_record`)
                await self._load(event, blobs, done_at)
                return
            else:
                raise PeerError(f"unexpected {type(event).__name__} while receiving the VM")

    def _start_cutover_timeline(self) -> None:
        """The cutover's fine marks start where this side's downtime work does: the streams' end
        reported (the source pauses on it), else the downtime's first message. Once."""
        if not self._cutover_timeline_started:
            self._timeline = Timeline()
            self._cutover_timeline_started = True

    async def _rehearse_restore(self) -> None:
        """Just before the source pauses (the streams' end reported): the restore's checks and
        copies once on this VM's own state (`vmstate.rehearse_restore`), so that the real one, in
        the downtime, runs warm. Only where that restore will run on the event loop in the flat
        form. The receive goes first (a page batch may wait), and a failure here costs only the
        warm-up: the real restore checks and says what is wrong."""
        negotiated = self.channel.conn.negotiated
        hosted = self.hosted
        if (
            negotiated is None
            or FLAT_MACHINE_STATE not in negotiated.capabilities
            or hosted is None
            or hosted.vm is None
            or len(hosted.vm.vcpus) > STATE_WORK_ON_LOOP_MAX_VCPUS
        ):
            return
        await trio.sleep(0)
        try:
            self._rehearsal_ms = round(vmstate.rehearse_restore(hosted) * 1e3, 3)
        except (KvmError, ValueError) as err:
            self.log.warning("restore_rehearsal_failed", error=str(err))

    async def _state_arrived(self, stats: MigrationStats) -> None:
        """The first device state: the source has paused, and every page it sends on this
        connection came before it. With verify = full announced, the digest starts here, once
        every data stream ended too (earlydigest.py)."""
        hosted = self.hosted
        assert hosted is not None and hosted.vm is not None and hosted.vm.memory is not None
        corrupt = faults.active("target-corrupt-ram")
        if self._verify_expected != "full" and not corrupt:
            return
        if self._streams is not None:
            await self._streams_ended(stats)
        # All memory is here: populating ahead of it would only take a core from the digest.
        for prefaulter in self._prefault:
            prefaulter.cancel()
        if corrupt:
            memory = hosted.vm.memory
            view = memory.view(memory.regions[0])
            view[0] ^= 0xFF  # one byte of guest RAM that the source never sent
            self.log.warning("test_fault_corrupted_ram", slot=memory.regions[0].slot, offset=0)
        if self._verify_expected == "full" and self._tasks is not None:
            self._early_digest = EarlyDigest(hosted.vm.memory)
            self._early_digest.start(self._tasks)
            self._timeline.mark("digest_started")
            self.log.info("target_digest_started", before_done=True)

    async def _streams_ended(self, stats: MigrationStats) -> None:
        """Every data stream's end marker arrived and all before it is in RAM (datastream.py
        rule 4), within peer.message_timeout_s of Done (or of the first final page on the
        control connection, or of the first device state with verify full). Counted once."""
        streams = self._streams
        assert streams is not None
        if self._streams_counted:
            return
        timeout = self.daemon.config.peer.message_timeout_s
        try:
            with trio.fail_after(timeout):
                # First the report (`report_end` in `_receive`, set at once without one): nothing
                # else goes out on this connection before it, and it is the streams' one waiter.
                # Not waited for once set: a wait on a set Event still passes through the
                # scheduler, inside the downtime (the final pages' way in).
                if not self._end_reported.is_set():
                    await self._end_reported.wait()
                await streams.wait_ended()
        except trio.TooSlowError:
            raise PeerError(
                f"not every data stream ended within {timeout:g} s of the downtime's first message "
                "(final pages, device state or Done)"
            ) from None
        except RemoteProtocolError as err:
            raise PeerError(str(err)) from None
        self._streams_counted = True
        if not self._streams_end_marked:
            self._timeline.mark("streams_ended")
        pages, zero_pages, nbytes, apply_s = streams.totals()
        stats.pages_sent += pages
        stats.zero_pages += zero_pages
        self._stream_bytes = nbytes  # added to the control connection's at COMMIT
        stats.bytes_sent += nbytes
        stats.apply_ms += apply_s * 1e3

    async def _load(self, done: Done, blobs: list[tuple[str, bytes]], done_at: float) -> None:
        """R9: all memory is in place; the digest of it, then the state, then LOADED.

        The digest comes first: it checks the memory as sent, and restoring device state may
        itself write guest RAM (on arm64, restoring the ITS consumes pending bits from the LPI
        pending table and clears them in memory). On x86 too: a digest run beside the restore
        mismatched for the small-OS guest (tests/migration/test_smallos_migration.py).
        """
        hosted, stats = self.hosted, self.stats
        assert hosted is not None and hosted.vm is not None and stats is not None
        # All memory is here: populating ahead of it would only take a core from the restore.
        for prefaulter in self._prefault:
            prefaulter.cancel()
        stats.state = stats.phase = "loading"
        # One worker-thread trip for the digest and the restore (on a loaded host each trip
        # waits for the scheduler twice); the restore runs only on a digest that matched.
        # Without a digest the restore alone runs here on the event loop, for a small VM
        # (window.py: the trip there and back cost more than the restore keeps the loop).
        early = self._early_digest if done.verify == "full" else None
        digest: bytes | None = None
        digest_us: int | None = None
        if early is not None:
            # Started when the state arrived, beside the source's: only what is left of it is
            # inside the downtime from here, and that is what the source learns as its cost.
            waited = time.perf_counter()
            digest = await early.sha256()
            digest_us = round((time.perf_counter() - waited) * 1e6)
            stats.verify_ms = early.ms
            self._timeline.mark("early_digest_done")
            self._check_digest(digest, done)
        try:
            if (done.verify != "full" or early is not None) and len(hosted.vm.vcpus) <= STATE_WORK_ON_LOOP_MAX_VCPUS:
                restored = self._digest_and_restore(done, blobs, in_worker=False, digested=early is not None)
            else:
                restored = await trio.to_thread.run_sync(self._digest_and_restore, done, blobs, True, early is not None)
        except (KvmError, ValueError) as err:
            raise Refused(f"state restore failed: {err}") from None
        self._timeline.mark("restore_returned")
        if restored is not None:
            digest = restored
            digest_us = round((stats.verify_ms or 0.0) * 1e3)
            self._check_digest(digest, done)
        if faults.active("target-refuse-loaded"):
            raise Refused("refusing at LOADED (test fault target-refuse-loaded)")
        # What loading cost here: the source learns the downtime's costs from it.
        load_us = round((time.perf_counter() - done_at) * 1e6)
        # At once (peer.py `_write_at_once`): the downtime's messages skip trio's send_all.
        await self.channel.send(Loaded(digest=digest, digest_us=digest_us, load_us=load_us), at_once=True)
        self._timeline.mark("loaded_sent")
        self.loaded = True
        self.daemon.incoming.record(stats.migration_id, "loaded")
        stats.state = stats.phase = "loaded"
        await faults.hold(self.log, "loaded")

    def _check_digest(self, digest: bytes, done: Done) -> None:
        """Recorded, then compared with the source's: a copy that differs is refused (R9)."""
        assert self.stats is not None
        self.stats.digest = digest.hex()
        if digest != done.digest:
            raise Refused("memory digest mismatch after loading: discarding this copy")

    def _digest_and_restore(
        self, done: Done, blobs: list[tuple[str, bytes]], in_worker: bool = True, digested: bool = False
    ) -> bytes | None:
        """The digest (with verify = full, unless `digested` early), then, if it matches, the
        state: in a worker thread, or on the event loop without a digest to take (`_load`).
        Returns the digest taken here, None if none was."""
        hosted, stats = self.hosted, self.stats
        assert hosted is not None and hosted.vm is not None and hosted.vm.memory is not None and stats is not None
        if in_worker:
            self._timeline.mark("worker_entered")
        digest = None
        if done.verify == "full" and not digested:
            verify_started = time.perf_counter()
            digest = memory_digest(hosted.vm.memory).sha256
            stats.verify_ms = (time.perf_counter() - verify_started) * 1e3
            if digest != done.digest:
                return digest
        restore_started = time.perf_counter()
        self._timeline.mark("digested")
        self._state_kind = blobs[0][0] if blobs else None
        steps = vmstate.restore(hosted, self.daemon.kvm, blobs)
        self._restore_steps_ms = {name: round(seconds * 1e3, 3) for name, seconds in steps.items()}
        stats.state_save_ms = (time.perf_counter() - restore_started) * 1e3
        self._timeline.mark("restored")
        return digest

    async def _await_commit(self) -> None:
        event = await self._next()
        if not isinstance(event, Commit):
            raise PeerError(f"expected Commit from the peer, got {type(event).__name__}")
        commit_at = time.perf_counter()
        resumed_at = commit_at
        timeline = self._timeline
        timeline.mark("commit_received")
        hosted, stats = self.hosted, self.stats
        assert hosted is not None and hosted.vm is not None and stats is not None
        # Every byte the source sent on this connection has arrived: the same count it reports.
        stats.bytes_sent = self.channel.conn.bytes_received + self._stream_bytes
        # Shielded: a query aborting this copy must find it either before COMMIT or running.
        with trio.CancelScope(shield=True):
            self.committed = True
            self.daemon.incoming.record(stats.migration_id, "running")
            if self.run_state == "running":
                # No worker thread: resuming only wakes the parked vCPU threads (Vcpu.resume).
                hosted.vm.resume()
                resumed_at = time.perf_counter()
                timeline.mark("resumed")
                hosted.state = VmState.RUNNING
            else:
                hosted.state = VmState.PAUSED
        stats.downtime_gc_ms = round(self._window.gc_ms_so_far(), 3)
        stats.downtime_realtime_threads = self._window.raised_threads
        # "completed" only once this side's part is done too (below): a status or a scrape read
        # after the source said completed must not find the target's record, join or timing missing.
        stats.state = stats.phase = "finishing"
        stats.total_ms = (time.monotonic() - self._started) * 1e3
        if stats.total_ms > 0:
            stats.bandwidth_mib_s = stats.bytes_sent / (1 << 20) / (stats.total_ms / 1e3)
        try:
            await self._send_running(commit_at, resumed_at)
            self.log.info("incoming_vm_running")
            self.log.info(
                "cutover_timeline",
                origin=timeline.origin,
                marks_ms=timeline.as_ms(),
                restore_steps_ms=self._restore_steps_ms,
                rehearsal_ms=self._rehearsal_ms,
                state_kind=self._state_kind,
            )
            await take_source_timing(self.channel, stats)
        finally:
            stats.state = stats.phase = "completed"
            hosted.last_migration = stats.as_dict()

    async def _send_running(self, commit_at: float, resumed_at: float) -> None:
        """RUNNING, then this side's bookkeeping: the VM runs here whether or not RUNNING went out."""
        hosted, timeline = self.hosted, self._timeline
        assert hosted is not None
        try:
            await faults.hold(self.log, "running")
            if faults.active("target-vanish-after-commit"):
                await self.channel.aclose()
                raise PeerError("dropped the link before RUNNING (test fault target-vanish-after-commit)")
            # A VM that stays paused (it was paused on the source) never resumes: resume_us 0.
            await self.channel.send(
                Running(
                    resume_us=round((resumed_at - commit_at) * 1e6),
                    reply_us=round((time.perf_counter() - commit_at) * 1e6),
                ),
                at_once=True,
            )
            timeline.mark("running_sent")
        finally:
            # After RUNNING, not before: the source's pause lasts until RUNNING arrives, and
            # neither the VM record (what a successor daemon reports, fsync'd) nor joining the
            # data threads (they ended at their end markers) is part of DESIGN 5's invariant.
            # Written whether or not RUNNING went out: the VM runs here.
            self._window.close()
            self._window.log_imports(self.log)
            with trio.CancelScope(shield=True):
                self.daemon.record_vm(hosted)
                await self._close_streams()

    async def _on_failure(self, reason: str) -> None:
        if self.committed:
            return  # the VM runs here; only the RUNNING answer was lost
        self.loaded = False
        await self._discard(reason)

    def abort_for_good(self, reason: str) -> None:
        """From another task: end this migration unless COMMIT came; `finished` tells when."""
        if self.committed:
            return
        self.abort_reason = reason
        self.scope.cancel()

    def _close_ram(self) -> None:
        """RAM made for a VM that was never built around it; after the streams that wrote it."""
        if self._ram is not None:
            self._ram.close()
            self._ram = None

    async def _close_streams(self) -> None:
        """Stop and join the data stream threads: none may write into RAM that is unmapped."""
        if self._streams is not None:
            await self._streams.aclose()

    async def record_written(self) -> None:
        """Until this copy's record (`_start_record`) is on disk: a discard waits for it before
        it removes the copy. Written after the removal, it would outlive the copy, and the next
        daemon would report a VM lost that never ran here."""
        try:
            await self._record.wait()
        except Exception:
            self.log.exception("vm_record_crashed")

    async def _discard(self, reason: str) -> None:
        await self._close_streams()
        await self.record_written()
        self._close_ram()
        hosted = self.hosted
        if self.stats is not None:
            self.stats.state = self.stats.phase = "aborted"
            self.stats.error = reason
            self.daemon.incoming.record(self.stats.migration_id, "aborted")
        if hosted is not None and hosted.state is VmState.INCOMING:
            self.log.info("incoming_vm_discarded", reason=reason)
            await self.daemon.remove_vm(hosted, f"incoming migration aborted: {reason}")
