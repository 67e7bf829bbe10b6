"""The source's setup, before the bulk copy (DESIGN section 4): the connection and its
handshake, the VM's description, the data streams, and the bulk copy's preparation (record,
re-arm, extents) beside them. A part of `Source` (source.py), which inherits it."""

from __future__ import annotations

import contextlib
from functools import partial
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from transport.datastream import Layout
from transport import Accept, MemoryRegion, Role, VmDescription

from .. import faults
from ..hosted import HostedVm
from ..peer import LinkLost, PeerChannel, PeerError, make_connection
from . import vmstate
from .host import MigrationHost
from .pagestream import PAGE_SIZE
from .peerconnect import connect_failure, connect_stream
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
    _received_before_description: int
    _vm_record_written: trio.Event | None

    async def _connect(self, timed: bool = False, then: VmDescription | None = None) -> PeerChannel:
        """`timed`: the setup's connection, whose steps go into the timeline. `then`: the VM's
        description, sent within the handshake, right behind this side's proof of the key
        (PeerChannel.handshake): one round trip fewer than after it."""
        peer = self.daemon.config.peer

        def connected() -> None:
            if timed:
                self._phase_steps.step("connect")
                self._setup_timeline.mark("connected")

        with trio.fail_after(peer.connect_timeout_s):
            stream = await connect_stream(self.options.host, self.options.port, peer, connected)
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
        description = self._description()
        warm = await self.daemon.warm_links.take(self.options.host, self.options.port, self.options.streams)
        if warm is not None:
            self._phase_steps.step("take_warm_link")
            self._setup_timeline.mark("warm_link_taken")
            self._channel = warm.channel  # closed with the migration, whatever happens from here
            try:
                await self._until_accept(
                    partial(self._describe_on, warm.channel, description),
                    warm.streams,
                    partial(self._prepare_on_loop, extents, prepared),
                )
                link = "warm"
            except LinkLost as err:
                if warm.channel.conn.bytes_received != self._received_before_description:
                    raise
                # The target closed this link before it answered the description: at its idle
                # deadline, over its idle-link limits, or stopping, each without reading on, so
                # no copy of the VM exists there for it. A target that did read it and failed
                # without an answer recorded this migration id and refuses it a second time
                # (incoming.py): a fresh connection can never make a second copy. The VM was
                # never paused; the link's warm streams were the dead link's alone (the target
                # closed them with it). Once: a second failure is the migration's.
                self.log.info("warm_link_lost", error=str(err))
                self._setup_timeline.mark("warm_link_lost")
                await self._drop_link()
                link = "fresh-after-warm"
            finally:
                if self._plane is None:  # no SendStreams took the warm streams over (and closes them)
                    for sock in warm.streams:
                        sock.close()
        else:
            link = "fresh"
        if link != "warm":
            await self._until_accept(partial(self._connect, timed=True, then=description))
        self.stats.link = link
        if not prepared.done.is_set():
            # Only when not set: waiting on a set trio Event is still a checkpoint, and on a busy
            # host the loop gave the GIL to the record's worker there and got it back ~1 ms later.
            await prepared.done.wait()
        if prepared.error is not None:
            raise prepared.error

    async def _until_accept(
        self,
        link: Callable[[], Awaitable[PeerChannel]],
        warm_streams: list[socket.socket] | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> None:
        """`link` connects (or takes a warm link) and sends the description; then the data
        streams open while the target checks it and makes the RAM, until its ACCEPT.
        `warm_streams`: a warm link's, connected already (the target holds them); `meanwhile`:
        run on the loop then, before the wait for ACCEPT."""
        try:
            async with trio.open_nursery() as nursery:
                self._channel = channel = await link()
                if warm_streams is not None:
                    nursery.start_soon(self._streams_over, channel, warm_streams)
                else:
                    # The data streams connect while the target makes the RAM (it holds them);
                    # after the description, so that the target knows the migration they name.
                    nursery.start_soon(self._open_streams_into, channel)
                if meanwhile is not None:
                    meanwhile()
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

    async def _streams_over(self, channel: PeerChannel, sockets: list[socket.socket]) -> None:
        """A warm link's streams take their threads from the parked ones (parkedthreads.py), on
        the loop: a handover, not a start. Started fresh, in a worker, each waited for the new
        thread to be scheduled, and the streams were the last step of a warm setup (2.5-2.8 ms
        after ACCEPT under load); a fresh start remains the fallback when none is parked."""
        self._plane = SendStreams.over(
            sockets, token=trio.lowlevel.current_trio_token(), **self._stream_parameters(channel)
        )
        self._setup_timeline.mark("streams_opened")

    async def _describe_on(self, channel: PeerChannel, description: VmDescription) -> PeerChannel:
        """The description on a warm link: its handshake is long done."""
        self._received_before_description = channel.conn.bytes_received
        await faults.hold(self.log, "setup")
        # At once (peer.py `_write_at_once`): out before the scheduler runs anything else, such
        # as the bulk copy's preparation starting its worker.
        await channel.send(description, at_once=True)
        self._phase_steps.step("describe")
        self._setup_timeline.mark("described")
        return channel

    async def _drop_link(self) -> None:
        """What a lost warm link's attempt opened: its streams and the link itself."""
        if self._plane is not None:
            await self._plane.aclose()
            self._plane = None
        if self._channel is not None:
            await self._channel.aclose()
            self._channel = None

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
                "allocated_bytes": vm.memory.allocated_bytes(),  # the target's RAM reserve picks by it
                **vmstate.cpu_features(self.daemon.kvm, vm),
            },
            dirty_tracking=vm.dirty_tracking,
            arch=vm.caps.arch,
            verify=self.options.verify,
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
        record = self.daemon.record_vm
        written = self._vm_record_written
        assert written is not None
        mark, slow = self._setup_timeline.mark, faults.active("source-record-slow")

        def rearm_find_extents_and_record() -> None:
            mark("worker_entered")
            if prepared.claim.acquire(blocking=False):  # not done on the loop already
                self._rearm_and_find_extents(extents, prepared)
                trio.from_thread.run_sync(self._on_prepared, prepared, started)
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

    def _rearm_and_find_extents(self, extents: dict[int, list[tuple[int, int]]], prepared: _Prepared) -> None:
        """R3's re-arm, then the RAM file's extents (`_prepare_bulk`); in either thread."""
        vm = self.hosted.vm
        assert vm is not None and vm.memory is not None and vm.tracker is not None
        memory = vm.memory
        try:
            vm.tracker.rearm()
            extents.update({region.slot: memory.data_extents(region) for region in memory.regions})
        except Exception as err:  # the setup raises it; the migration fails and resumes
            prepared.error = err

    def _on_prepared(self, prepared: _Prepared, started: float) -> None:  # in trio's thread
        self._setup_timeline.mark("extents_found")
        self._last_collect = time.perf_counter()
        self._phase_steps.add("overlapped.rearm_extents", started)
        prepared.done.set()

    def _prepare_on_loop(self, extents: dict[int, list[tuple[int, int]]], prepared: _Prepared) -> None:
        """A warm link's setup: with the description out and the streams connected, the loop
        only waits for ACCEPT (the target's check and RAM, a round trip), so the re-arm and the
        extents run here meanwhile instead of waiting for the worker thread to be scheduled
        (the last step of a warm setup on a busy host). The worker then only writes the record."""
        if prepared.claim.acquire(blocking=False):
            started = time.perf_counter()
            self._rearm_and_find_extents(extents, prepared)
            self._on_prepared(prepared, started)

    def _stream_parameters(self, channel: PeerChannel) -> dict[str, Any]:
        """What this migration's streams are made with, but their sockets (SendStreams.over)."""
        vm = self.hosted.vm
        assert vm is not None and vm.memory is not None
        negotiated = channel.conn.negotiated
        assert negotiated is not None
        return {
            "secret": channel.conn.data_stream_secret(),
            "sealed": negotiated.auth == "psk",
            "memory": vm.memory,
            "layout": Layout({r.slot: r.pages for r in vm.memory.regions}, PAGE_SIZE, negotiated.max_batch_bytes),
            "batch_pages": batch_pages_for(negotiated.max_batch_bytes),
            "bandwidth_bytes_s": self.options.max_bandwidth_mib_s * MIB,
        }

    async def _open_streams(self, channel: PeerChannel) -> SendStreams:
        peer = self.daemon.config.peer
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
                    migration_id=self.stats.migration_id,
                    count=self.options.streams,
                    **self._stream_parameters(channel),
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
        self.claim = threading.Lock()  # the re-arm and the extents: whichever thread takes it


def batch_pages_for(max_batch_bytes: int) -> int:
    """Pages per batch so that data and both index arrays fit the negotiated payload."""
    return max(1, max_batch_bytes // (PAGE_SIZE + 16))
