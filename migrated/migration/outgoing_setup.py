"""The source's setup, before the bulk copy (DESIGN section 4): the connection and its
handshake, the VM's description, the data streams, and the bulk copy's preparation (record,
re-arm, extents) beside them. A part of `Source` (source.py), which inherits it."""

from __future__ import annotations

import contextlib
from functools import partial
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING

import trio

from transport.datastream import Layout
from transport import Accept, MemoryRegion, Role, VmDescription

from .. import faults, tls
from ..hosted import HostedVm
from ..peer import PeerChannel, PeerError, make_connection
from . import vmstate
from .host import MigrationHost
from .pagestream import PAGE_SIZE
from .precopy import MigrationFailed
from .sendstreams import SendStreams
from .stats import MigrationStats, StepTimes
from .timeline import Timeline

from .source_options import SourceOptions

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

MIB = 1 << 20
SLOW_RECORD_S = 0.5  # fault source-record-slow


class OutgoingSetup:
    """What `Source` sets up before its bulk copy; the attributes are Source's."""

    daemon: MigrationHost
    hosted: HostedVm
    options: SourceOptions
    stats: MigrationStats
    log: FilteringBoundLogger
    was_paused: bool
    _phase_steps: StepTimes
    _plane: SendStreams | None
    _channel: PeerChannel | None
    _last_collect: float
    _setup_timeline: Timeline
    _vm_record_written: trio.Event | None

    async def _connect(self, timed: bool = False, then: VmDescription | None = None) -> PeerChannel:
        """`timed`: the setup's connection, whose steps go into the timeline. `then`: the VM's
        description, sent within the handshake, right behind this side's proof of the key
        (PeerChannel.handshake): one round trip fewer than after it."""
        peer = self.daemon.config.peer
        with trio.fail_after(peer.connect_timeout_s):
            try:
                raw = await trio.open_tcp_stream(self.options.host, self.options.port)
            except OSError as err:
                raise PeerError(f"cannot connect to the peer {self.stats.peer}: {connect_failure(err)}") from err
            if timed:
                self._phase_steps.step("connect")
                self._setup_timeline.mark("connected")
            stream: trio.abc.Stream = raw
            if peer.auth == "tls":
                try:
                    stream = await tls.wrap_client(raw, peer, self.options.host)
                except (ssl.SSLError, trio.BrokenResourceError) as err:
                    raise PeerError(f"TLS handshake with the peer failed: {err}") from err
        channel = PeerChannel(
            stream,
            make_connection(Role.SOURCE, peer, self.daemon.node, self.options.max_batch_bytes),
            io_timeout_s=peer.connect_timeout_s,
        )
        if then is not None:
            await faults.hold(self.log, "setup")
        with trio.fail_after(peer.connect_timeout_s):
            await channel.handshake(then, self._setup_timeline.mark if timed else _no_mark)
        if timed:
            self._phase_steps.step("handshake_and_describe" if then is not None else "handshake")
        return channel

    async def _set_up(self, extents: dict[int, list[tuple[int, int]]]) -> None:
        """Connect, describe the VM and open the data streams, until the target's ACCEPT, and
        the bulk copy's preparation (`_prepare_bulk`), which runs beside them."""
        prepared = _Prepared()
        self._vm_record_written = trio.Event()
        self.daemon.start_task(partial(self._prepare_bulk, extents, prepared))
        try:
            async with trio.open_nursery() as nursery:
                self._channel = channel = await self._connect(timed=True, then=self._description())
                # The data streams connect while the target makes the RAM (it holds them); after
                # the description, so that the target knows the migration they name.
                nursery.start_soon(self._open_streams_into, channel)
                with trio.fail_after(self.daemon.config.peer.connect_timeout_s):
                    await channel.expect(Accept)
                self._phase_steps.step("accept")
                self._setup_timeline.mark("accept_received")
        except BaseExceptionGroup as group:
            # The failure is the migration's (a refusal, a stream that did not connect), not
            # the cancellation it caused in the other tasks.
            errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
            if errors:
                raise errors[0] from None
            raise
        await prepared.done.wait()
        if prepared.error is not None:
            raise prepared.error

    def _description(self) -> VmDescription:
        hosted = self.hosted
        vm = hosted.vm
        assert vm is not None and vm.memory is not None
        return VmDescription(
            name=hosted.name,
            migration_id=self.stats.migration_id,
            memory=tuple(MemoryRegion(r.slot, r.guest_phys_addr, r.size) for r in vm.memory.regions),
            vcpus=len(vm.vcpus),
            guest_kind=hosted.spec.guest,
            cpu_features={
                "spec": hosted.spec.to_wire(),
                "run_state": "paused" if self.was_paused else "running",
                **(
                    {"memory_backing": self.options.target_memory_backing} if self.options.target_memory_backing else {}
                ),
                "data_streams": self.options.streams,
                **vmstate.cpu_features(self.daemon.kvm, vm),
            },
            dirty_tracking=vm.dirty_tracking,
            arch=vm.caps.arch,
        )

    async def _open_streams_into(self, channel: PeerChannel) -> None:
        started = time.perf_counter()
        self._plane = await self._open_streams(channel)
        self._setup_timeline.mark("streams_opened")
        self._phase_steps.add("overlapped.open_streams", started)

    async def _prepare_bulk(self, extents: dict[int, list[tuple[int, int]]], prepared: _Prepared) -> None:
        """One worker trip beside the setup, in the daemon's nursery (it may outlive the setup).

        First R3: the first collection re-arms tracking before the bulk copy reads any page,
        so every write from here on is in a later collection; the RAM file's extents are taken
        after it (a page first written in between is in that collection); `prepared` tells the
        setup. A migration that fails before its bulk copy lost nothing by the re-arm: every one
        re-arms first. Then the VM's record that it is migrating (fsync'd: 1-20 ms on this
        project's shared disks, which the setup used to wait for), beside the bulk copy. Every
        later write of the VM's record waits for it (`_vm_record_written`), so it never
        overwrites a newer one; until then nothing else writes it (pause and resume refuse a
        migrating VM). One trip, not two: a second worker thread is one more to start (the
        loop waits for a new thread to run) and to schedule while the setup runs."""
        hosted = self.hosted
        vm = hosted.vm
        assert vm is not None and vm.memory is not None and vm.tracker is not None
        memory, tracker, record = vm.memory, vm.tracker, self.daemon.record_vm
        written = self._vm_record_written
        assert written is not None
        mark, slow = self._setup_timeline.mark, faults.active("source-record-slow")

        def on_prepared() -> None:  # in trio's thread
            mark("extents_found")
            self._last_collect = time.perf_counter()
            self._phase_steps.add("overlapped.rearm_extents", started)
            prepared.done.set()

        def rearm_find_extents_and_record() -> None:
            mark("worker_entered")
            try:
                tracker.rearm()
                extents.update({region.slot: memory.data_extents(region) for region in memory.regions})
            except Exception as err:  # the setup raises it; the migration fails and resumes
                prepared.error = err
            trio.from_thread.run_sync(on_prepared)
            if prepared.error is not None:
                return  # the resume writes the record
            if slow:
                time.sleep(SLOW_RECORD_S)
            record(hosted)  # logs, never raises, an OSError: the VM is fine, only its record is not

        started = time.perf_counter()
        try:
            await trio.to_thread.run_sync(rearm_find_extents_and_record)
        except Exception:  # a bug here must not end the daemon's nursery
            self.log.exception("migration_preparation_crashed")
            if prepared.error is None and not prepared.done.is_set():
                prepared.error = MigrationFailed("the bulk copy's preparation failed; the VM keeps running here")
        finally:
            prepared.done.set()
            written.set()
            mark("worker_returned")
            self._phase_steps.add("overlapped.rearm_extents_record", started)

    async def _open_streams(self, channel: PeerChannel) -> SendStreams:
        vm = self.hosted.vm
        assert vm is not None and vm.memory is not None
        conn = channel.conn
        negotiated = conn.negotiated
        assert negotiated is not None
        peer = self.daemon.config.peer
        layout = Layout({r.slot: r.pages for r in vm.memory.regions}, PAGE_SIZE, negotiated.max_batch_bytes)
        with trio.fail_after(peer.connect_timeout_s * 2), contextlib.ExitStack() as fault:
            port = self.options.port
            if faults.active("source-streams-refused"):
                # A port of this host that is bound and not listening: the kernel refuses it.
                closed = fault.enter_context(socket.socket())
                closed.bind((self.options.host, 0))
                port = closed.getsockname()[1]
            try:
                return await SendStreams.open(
                    host=self.options.host,
                    port=port,
                    peer=peer,
                    secret=conn.data_stream_secret(),
                    sealed=negotiated.auth == "psk",
                    migration_id=self.stats.migration_id,
                    count=self.options.streams,
                    memory=vm.memory,
                    layout=layout,
                    batch_pages=batch_pages_for(negotiated.max_batch_bytes),
                    bandwidth_bytes_s=self.options.max_bandwidth_mib_s * MIB,
                )
            except (OSError, ssl.SSLError) as err:
                raise PeerError(f"cannot open the data streams to {self.stats.peer}: {connect_failure(err)}") from err


def _no_mark(name: str) -> None:
    pass


class _Prepared:
    """The bulk copy's preparation, as the setup waits for it: done, and the error if it failed."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: Exception | None = None


def connect_failure(err: OSError) -> str:
    """The cause of a failed connect, without the errno noise: "Name or service not known" for
    a host name that does not resolve; for refused or unreachable addresses (which trio reports
    as "all attempts to connect to ... failed"), the first attempt's reason."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
            continue
        if isinstance(cause, OSError) and cause.strerror:
            # trio's own message repeats the address; the errno's text is the reason alone.
            code = cause.errno
            return os.strerror(code) if isinstance(code, int) and code > 0 else str(cause.strerror)
        cause = cause.__cause__
    return str(err) or type(err).__name__


def batch_pages_for(max_batch_bytes: int) -> int:
    """Pages per batch so that data and both index arrays fit the negotiated payload."""
    return max(1, max_batch_bytes // (PAGE_SIZE + 16))
