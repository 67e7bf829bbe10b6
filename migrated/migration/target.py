"""The target side of a live migration, one per incoming peer connection.

The VM is created under the same rules R1/R2 as any other, its pages applied as they come, its
state restored once all memory is in place (R9), verified, and resumed only on COMMIT (DESIGN
section 5). Before LOADED any failure discards the copy. After LOADED, a lost link leaves the copy
paused: asked again, this side aborts for good (it never got COMMIT) and says so.
"""

from __future__ import annotations

import os
import signal
import ssl
import time
from typing import Any, Literal

import trio

from transport import (
    Accept,
    Commit,
    DeviceState,
    Done,
    Loaded,
    PageBatch,
    Query,
    QueryResult,
    Role,
    Running,
    VmDescription,
)

from .. import faults, tls
from ..hosted import HostedVm, SpecError, VmSpec, VmState, create_incoming, vm_config
from ..kvm.arch import host_arch
from ..kvm.errors import KvmError
from ..logs import get_logger
from ..overcommit import OvercommitRefused
from ..pagehash import memory_digest
from ..peer import PeerAborted, PeerChannel, PeerError, make_connection
from . import vmstate
from .host import MigrationHost
from .pagestream import PAGE_SIZE, apply_batch
from .prefault import Prefaulter
from .stats import MigrationStats


class Refused(Exception):
    """This daemon cannot host the described VM; the reason goes back to the source."""


class Target:
    def __init__(self, daemon: MigrationHost, stream: trio.SocketStream, peer: str) -> None:
        self.daemon = daemon
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
        self.reserved_name: str | None = None
        self.admitted_id: str | None = None  # counted in daemon.incoming until the connection ends
        self.scope = trio.CancelScope()  # cancelled when a query aborts this copy for good
        self.abort_reason = ""
        self.finished = trio.Event()  # set once this connection's outcome is recorded
        self._started = time.monotonic()
        self._prefault: list[Prefaulter] = []

    async def run(self) -> None:
        try:
            with self.scope:
                await self._run()
            if self.scope.cancelled_caught:
                self.log.warning("incoming_aborted_for_good", reason=self.abort_reason)
                await self._on_failure(self.abort_reason)
        finally:
            if self.reserved_name is not None:
                self.daemon.release_name(self.reserved_name)
            if self.admitted_id is not None:
                self.daemon.incoming.leave(self.admitted_id)
            self.daemon.finish_incoming(self)
            await self.channel.aclose()
            self.finished.set()

    async def _run(self) -> None:
        peer_config = self.daemon.config.peer
        try:
            # Phase "setup": authentication and the first message, under one deadline, so a
            # peer that trickles its handshake gets no more time than one that stalls.
            with trio.fail_after(peer_config.connect_timeout_s):
                if peer_config.auth == "tls":
                    try:
                        self.channel.stream = await tls.wrap_server(self._raw, peer_config)
                    except (ssl.SSLError, trio.BrokenResourceError) as err:
                        raise PeerError(f"TLS handshake failed: {err}") from err
                await self.channel.handshake()
                first = await self.channel.receive()
            if isinstance(first, Query):
                await self._answer_query(first)
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

    async def _answer_query(self, query: Query) -> None:
        live = self.daemon.incoming.live.get(query.migration_id)
        if live is not None:
            # Still on its first connection: unless COMMIT came, it aborts for good now, and
            # the answer waits for its recorded outcome (DESIGN 5: only then may the source resume).
            live.abort_for_good("the source asked after a lost link; no COMMIT came")
            with trio.move_on_after(self.daemon.config.peer.message_timeout_s):
                await live.finished.wait()
            if not live.finished.is_set():
                raise PeerError(f"migration {query.migration_id} is still being discarded; ask again")
        outcome = self.daemon.incoming.outcome(query.migration_id)
        answer: Literal["running", "aborted", "unknown"]
        if outcome is None:
            answer = "unknown"
        elif outcome == "running":
            answer = "running"
        else:
            answer = "aborted"
        self.log.info("query_answered", migration_id=query.migration_id, answer=answer)
        await self.channel.send(QueryResult(migration_id=query.migration_id, state=answer))

    def _check(self, description: VmDescription) -> VmSpec:
        caps = self.daemon.kvm.caps()
        if not isinstance(description.cpu_features, dict):
            raise Refused("VM description: cpu_features must be a map")
        features = description.cpu_features
        spec_wire = features.get("spec")
        if not isinstance(spec_wire, dict):
            raise Refused("VM description: cpu_features has no VM spec map")
        try:
            spec = VmSpec.from_wire(dict(spec_wire))
        except SpecError as err:
            raise Refused(f"VM description: {err}") from None
        if spec.name != description.name:
            raise Refused(f"VM description names {description.name!r} but its spec {spec.name!r}")
        if description.arch != caps.arch:
            raise Refused(f"VM is {description.arch}; this host is {caps.arch}")
        if description.vcpus != spec.vcpus or description.vcpus > caps.max_vcpus:
            raise Refused(f"{description.vcpus} vCPUs: this host allows 1 to {caps.max_vcpus}")
        layout = [(r.slot, r.guest_phys_addr, r.size) for r in description.memory]
        ram_base = host_arch(caps.arch).ram_base
        if layout != [(0, ram_base, spec.memory_bytes)]:
            raise Refused(f"memory layout {layout}: this daemon hosts one slot at {ram_base:#x} of the spec's size")
        try:
            self.daemon.check_overcommit(spec)
        except OvercommitRefused as err:
            raise Refused(str(err)) from None
        problem = vmstate.incompatibility(dict(features), self.daemon.kvm)
        if problem:
            raise Refused(problem)
        run_state = features.get("run_state", "running")
        if run_state not in ("running", "paused"):
            raise Refused(f"run_state {run_state!r}: allowed are running, paused")
        self.run_state = run_state
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
        spec = self._check(description)
        self.stats = stats = MigrationStats(
            migration_id=description.migration_id, vm=spec.name, role="target", peer=self.peer
        )
        self.log = self.log.bind(vm=spec.name, migration_id=description.migration_id)
        defaults = self.daemon.config.vm
        try:
            config = vm_config(spec, defaults.dirty_tracking, defaults.ring_bytes, defaults.harvest_interval_ms)
            self.hosted = await trio.to_thread.run_sync(
                create_incoming, self.daemon.kvm, spec, config, self.daemon.console_log(spec)
            )
        except (KvmError, SpecError, ValueError) as err:
            raise Refused(f"cannot create VM {spec.name} here: {err}") from None
        self.daemon.register_incoming(self.hosted, self)
        self.reserved_name = None  # the name is the VM's now; releasing it later could free another's claim
        # What this copy tracks with, resolved ("ring", not "auto"), as the source reports its own.
        stats.dirty_tracking = self.hosted.vm.dirty_tracking if self.hosted.vm is not None else config.dirty_tracking
        await self.channel.send(Accept())
        stats.setup_ms = (time.monotonic() - started) * 1e3
        self.log.info("incoming_vm_accepted", memory_mib=spec.memory_mib, vcpus=spec.vcpus)
        vm = self.hosted.vm
        assert vm is not None and vm.memory is not None
        views = {r.slot: vm.memory.view(r).reshape(-1, PAGE_SIZE) for r in vm.memory.regions}
        prefault = {r.slot: Prefaulter(vm.memory.host_address(r), r.size) for r in vm.memory.regions}
        self._prefault = list(prefault.values())
        timeout = self.daemon.config.migration.timeout_s
        try:
            try:
                with trio.fail_after(timeout):
                    await self._receive(stats, views, prefault)
            except trio.TooSlowError:
                raise PeerError(f"the VM did not arrive within {timeout:g} s (migration.timeout_s)") from None
            await self._await_commit()
        finally:
            # Joined only now, off the downtime (`_load` told them to stop), and before a
            # discard unmaps the memory they populate.
            for prefaulter in prefault.values():
                prefaulter.stop()

    async def _receive(self, stats: MigrationStats, views: dict[int, Any], prefault: dict[int, Prefaulter]) -> None:
        blobs: list[tuple[str, bytes]] = []
        stats.state = stats.phase = "receiving"
        while True:
            event = await self._next()
            if isinstance(event, PageBatch):
                applied = time.perf_counter()
                apply_batch(views[event.slot], event, ram_is_fresh=event.round == 0)
                stats.apply_ms += (time.perf_counter() - applied) * 1e3
                if event.round == 0 and event.pages.size:
                    prefault[event.slot].advance((int(event.pages[-1]) + 1) * PAGE_SIZE, event.data_bytes)
                stats.pages_sent += int(event.pages.size)
                stats.zero_pages += int(event.zero_pages.size)
                stats.bytes_sent += event.data_bytes
                stats.round = event.round
            elif isinstance(event, DeviceState):
                # Bounded before it is kept (DESIGN 6): each expected kind once, nothing else.
                if event.kind not in vmstate.KINDS or event.kind in (kind for kind, _ in blobs):
                    raise Refused(
                        f"device state {event.kind!r} unexpected (allowed once each: "
                        f"{', '.join(sorted(vmstate.KINDS))})"
                    )
                blobs.append((event.kind, event.blob))
            elif isinstance(event, Done):
                if faults.active_once("target-stop-on-done"):
                    os.kill(os.getpid(), signal.SIGSTOP)  # resumes when the test sends SIGCONT
                await self._load(event, blobs)
                return
            else:
                raise PeerError(f"unexpected {type(event).__name__} while receiving the VM")

    async def _load(self, done: Done, blobs: list[tuple[str, bytes]]) -> None:
        """R9: all memory is in place; the digest of it, then the state, then LOADED.

        The digest comes first: it checks the memory as sent, and restoring device state may
        itself write guest RAM (on arm64, restoring the ITS consumes pending bits from the LPI
        pending table and clears them in memory).
        """
        hosted, stats = self.hosted, self.stats
        assert hosted is not None and hosted.vm is not None and stats is not None
        # All memory is here: populating ahead of it would only take a core from the restore.
        for prefaulter in self._prefault:
            prefaulter.cancel()
        stats.state = stats.phase = "loading"
        # One worker-thread trip for the digest and the restore (on a loaded host each trip
        # waits for the scheduler twice); the restore runs only on a digest that matched.
        try:
            digest = await trio.to_thread.run_sync(self._digest_and_restore, done, blobs)
        except (KvmError, ValueError) as err:
            raise Refused(f"state restore failed: {err}") from None
        if digest is not None:
            stats.digest = digest.hex()
            if digest != done.digest:
                raise Refused("memory digest mismatch after loading: discarding this copy")
        if faults.active("target-refuse-loaded"):
            raise Refused("refusing at LOADED (test fault target-refuse-loaded)")
        await self.channel.send(Loaded(digest=digest))
        self.loaded = True
        self.daemon.incoming.record(stats.migration_id, "loaded")
        stats.state = stats.phase = "loaded"
        await faults.hold(self.log, "loaded")

    def _digest_and_restore(self, done: Done, blobs: list[tuple[str, bytes]]) -> bytes | None:
        """In a worker thread: the digest (with verify = full), then, if it matches, the state."""
        hosted, stats = self.hosted, self.stats
        assert hosted is not None and hosted.vm is not None and hosted.vm.memory is not None and stats is not None
        digest = None
        if done.verify == "full":
            verify_started = time.perf_counter()
            digest = memory_digest(hosted.vm.memory).sha256
            stats.verify_ms = (time.perf_counter() - verify_started) * 1e3
            if digest != done.digest:
                return digest
        restore_started = time.perf_counter()
        vmstate.restore(hosted, self.daemon.kvm, blobs)
        stats.state_save_ms = (time.perf_counter() - restore_started) * 1e3
        return digest

    async def _await_commit(self) -> None:
        event = await self._next()
        if not isinstance(event, Commit):
            raise PeerError(f"expected Commit from the peer, got {type(event).__name__}")
        hosted, stats = self.hosted, self.stats
        assert hosted is not None and hosted.vm is not None and stats is not None
        # Shielded: a query aborting this copy must find it either before COMMIT or running.
        with trio.CancelScope(shield=True):
            self.committed = True
            self.daemon.incoming.record(stats.migration_id, "running")
            if self.run_state == "running":
                # No worker thread: resuming only wakes the parked vCPU threads (Vcpu.resume).
                hosted.vm.resume()
                hosted.state = VmState.RUNNING
            else:
                hosted.state = VmState.PAUSED
            self.daemon.record_vm(hosted)
        stats.state = stats.phase = "completed"
        stats.total_ms = (time.monotonic() - self._started) * 1e3
        if stats.total_ms > 0:
            stats.bandwidth_mib_s = stats.bytes_sent / (1 << 20) / (stats.total_ms / 1e3)
        self.log.info("incoming_vm_running")
        await faults.hold(self.log, "running")
        if faults.active("target-vanish-after-commit"):
            await self.channel.aclose()
            raise PeerError("dropped the link before RUNNING (test fault target-vanish-after-commit)")
        await self.channel.send(Running())
        hosted.last_migration = stats.as_dict()

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

    async def _discard(self, reason: str) -> None:
        hosted = self.hosted
        if self.stats is not None:
            self.stats.state = self.stats.phase = "aborted"
            self.stats.error = reason
            self.daemon.incoming.record(self.stats.migration_id, "aborted")
        if hosted is not None and hosted.state is VmState.INCOMING:
            self.log.info("incoming_vm_discarded", reason=reason)
            await self.daemon.remove_vm(hosted, f"incoming migration aborted: {reason}")
