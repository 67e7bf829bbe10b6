"""The source side of a live migration (DESIGN sections 4 and 5).

setup -> bulk copy -> dirty rounds until the predicted downtime fits -> downtime in the order of
R6 -> cutover. Until COMMIT is sent, any failure resumes the VM here. Once the VM is recorded as
the target's and COMMIT is sent, the VM is never resumed blindly: without RUNNING it stays paused
and in doubt until the target is asked again (or the operator decides).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from collections.abc import Sequence
from typing import TypeVar

import trio

from transport import (
    Close,
    Commit,
    DeviceState,
    Done,
    Event,
    Loaded,
    PageBatch,
    Progress,
    ProtocolError,
    Running,
)

from .. import faults
from ..hosted import HostedVm, VmState
from ..kvm.dirty import DirtyPages
from ..kvm.vcpu import VcpuRunState
from ..logs import get_logger
from ..pagehash import memory_digest
from ..statedir import StateDirError, write_record
from ..vcpupriority import YieldingVcpus
from ..peer import FINAL_PAGES_ON_CONTROL, FLAT_MACHINE_STATE, PeerChannel, PeerError
from . import vmstate
from .downtime_models_file import save_models
from .host import MigrationHost
from .indoubt import InDoubt
from .hostspeed import HostSpeed
from .finalpass import CONTROL_FINAL_MAX_PAGES, final_batches_of
from .pagestream import StreamCounters
from .outgoing_setup import OutgoingSetup, batch_pages_for
from .precopy import MigrationFailed, Precopy, target_ram_bytes
from .source_options import SourceOptions as SourceOptions  # re-exported: service.py, tests
from .sendstreams import Pass, SendStreams
from .timeline import StepClock, Timeline, guest_downtime_ms
from .policy import (
    DigestSample,
    RateMeter,
)
from .stats import MigrationStats, StepTimes
from .window import STATE_WORK_ON_LOOP_MAX_VCPUS, DowntimeWindow

E = TypeVar("E", bound=Event)

MIB = 1 << 20
PROGRESS_INTERVAL_S = 0.1  # how often the stats read the data threads' counters
SLOW_RESUME_S = 0.5  # fault source-resume-slow
# How long the pause may hold the event loop (`_downtime_until_loaded`) before the wait for the
# vCPUs to park moves to a worker: 0.2-0.7 ms is usual, 5-11 ms a preempted vCPU thread's.
LOOP_PARK_WAIT_S = 0.01


class Source(OutgoingSetup, Precopy, InDoubt):
    def __init__(self, daemon: MigrationHost, hosted: HostedVm, options: SourceOptions, migration_id: str) -> None:
        self.daemon = daemon
        self.hosted = hosted
        self.options = options
        self.stats = MigrationStats(
            migration_id=migration_id,
            vm=hosted.name,
            role="source",
            peer=f"{options.host}:{options.port}",
            downtime_limit_ms=options.downtime_limit_ms,
        )
        self.log = get_logger(component="source", vm=hosted.name, migration_id=migration_id, peer=self.stats.peer)
        self.cancel_scope = trio.CancelScope()
        self._progress_scope = trio.CancelScope()  # its deadline moves with every batch sent
        self._cancel_reason: str | None = None
        self.operator_cancelled = False
        self.committed = False
        self.was_paused = False
        self._started = time.monotonic()
        self._phase_steps = StepTimes(self.stats.phase_steps_ms)
        self._paused_at: float | None = None
        self._bandwidth = RateMeter()
        self._dirty_rate = RateMeter()
        self._plane: SendStreams | None = None
        self._channel: PeerChannel | None = None
        self._last_collect = time.perf_counter()
        self._data_pages = 0  # pages in the memfd's data extents: what a digest must read
        self._throttle_step = -1  # index into THROTTLE_STEPS; -1: the guest runs at full speed
        self._dirty_shares: list[float] = []  # per vCPU, policy "dirty-limit"; empty: not limiting
        self._dirty_limit_exhausted = False
        self._downtime_bytes = 0  # what the downtime's send moved (pages and state)
        self._digest_sample: DigestSample | None = None  # `_price_digest`
        self._predicted_final_pages = 0  # the converged prediction's pages (`_final_pages_on_control`)
        self._control_counters = StreamCounters()  # final pages sent on the control connection
        self._downtime_steps = downtime_steps(False, False)  # set for the path the downtime takes
        self._early_end: Pass | None = None  # the streams' end markers, sent before the pause
        self._bulk_pages: int | None = None  # pages in the bulk copy, while it runs
        self._target_digest_ms: float | None = None  # as the target reported it in LOADED
        self._host_speed = HostSpeed()  # the sends' pace: is the host slower than when costs were learned?
        # From the pause to RUNNING: the collector off, the threads at SCHED_FIFO (window.py).
        self._window = DowntimeWindow(
            realtime=daemon.config.migration.downtime_realtime,
            idle_polling=daemon.config.migration.downtime_idle_polling,
        )
        self._pause_raised: set[int] = set()  # vCPU threads raised for the pause, not yet lowered
        self._timeline = Timeline()  # restarted at the pause: the downtime's fine marks
        self._setup_timeline = Timeline()  # the setup's fine marks, from the migrate command on
        # Once the "migrating" VM record is on its way (`_prepare_bulk`): set when it is done.
        self._vm_record_written: trio.Event | None = None
        self._commit_recorded = False  # the "committing" record is on disk (`_downtime`)
        # Costs learned from migrations to this peer only: another path's say nothing about it.
        self._model = daemon.downtime_models.for_peer(self.stats.peer)
        limits = daemon.config.migration
        self._yielding = YieldingVcpus(limits.vcpu_nice, limits.vcpu_sched_idle_s > 0)
        self._sched_idle_s = limits.vcpu_sched_idle_s
        self._sched_idle_scope = trio.CancelScope()  # the SCHED_IDLE bound's timer (`_yield_vcpus`)

    # ---- entry --------------------------------------------------------------------------

    async def run(self) -> None:
        hosted = self.hosted
        vm = hosted.vm
        assert vm is not None and vm.tracker is not None
        self._phase_steps.step("task_start")
        self._setup_timeline.mark("task_started")
        self.stats.dirty_tracking = vm.dirty_tracking
        if vm.memory is not None:
            self.stats.memory_backing = vm.memory.backing.kind
        self.stats.backup_bitmap = vm.tracker.stats.backup_bitmap
        # A VM the operator paused migrates paused and stays paused on the target.
        self.was_paused = hosted.state is VmState.PAUSED
        hosted.state = VmState.MIGRATING
        self._yield_vcpus()
        # The setup is a chain of hops between this loop and the target's, each a wake-up; at
        # the normal policy a shared core time-sliced the two loops against each other, ~2 ms a
        # turn (perf sched here). Raised until the bulk copy (`_migrate`), whose work is the
        # stream threads'; the downtime's window raises it again.
        self._window.raise_event_loop()
        try:
            # The time limit covers everything before the downtime; _downtime lifts it.
            self.cancel_scope.deadline = trio.current_time() + self._time_limit_s()
            self._note_progress()
            with self.cancel_scope, self._progress_scope:
                await self._migrate()
            if self._progress_scope.cancelled_caught and not self.committed:
                raise MigrationFailed(
                    f"no progress for {self.options.progress_timeout_s:g} s (nothing reached the target); "
                    "cancelled, the VM keeps running here"
                )
            if self.cancel_scope.cancelled_caught and not self.committed:
                raise MigrationFailed(
                    self._cancel_reason or f"timed out after {self._time_limit_s():g} s; the VM keeps running here"
                )
        except (MigrationFailed, PeerError, OSError, trio.TooSlowError) as err:
            await self._fail(err)
        except Exception as err:  # a bug in one migration must not take the daemon down
            self.log.exception("migration_crashed")
            await self._fail(err)
        finally:
            self._window.close()  # a migration that never reached its downtime lowers the loop here
            if self.stats.total_ms is None:
                # A completed migration's was taken when it completed (`_release`): freeing the
                # source's copy afterwards (threads joined, RAM unmapped) is not migration time.
                self.stats.total_ms = (time.monotonic() - self._started) * 1e3
            if self._plane is not None:
                await self._plane.aclose()
            if self._channel is not None:
                await self._channel.aclose()
            self._sched_idle_scope.cancel()
            self._unyield_vcpus()  # in doubt the VM stays paused here: it resumes at its own value
            if self.stats.state == "completed":  # the next migration there finds a link ready
                self.daemon.warm_links.warm(self.options.host, self.options.port)
            hosted.last_migration = self.stats.as_dict()

    async def _fail(self, err: BaseException) -> None:
        message = str(err) or type(err).__name__
        if isinstance(err, (PeerError, OSError)) and self.stats.peer not in message:
            # "sending PageBatch failed: socket connection broken" alone does not say which link.
            message = f"link to {self.stats.peer}: {message}"
        self.stats.error = message
        if self.committed:
            # DESIGN 5: COMMIT went out and RUNNING never came; the target may be running the VM.
            self.stats.state = "in-doubt"
            self.hosted.state = VmState.IN_DOUBT
            self.daemon.record_vm(self.hosted)
            self.log.error("migration_in_doubt", error=message)
            self.daemon.start_task(self.resolve)
            return
        if self._commit_recorded:
            # COMMIT never left: the record written before the pause no longer holds.
            self._record_after("resumed-before-commit")
        if self._plane is not None:
            await self._plane.aclose()  # no thread reads guest RAM once the VM runs here again
        if self._channel is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self._channel.abort(message)
        await self._resume_here()
        # The outcome is published last: whoever sees "failed" finds the VM running here.
        self.stats.state = self.stats.phase = "cancelled" if self.operator_cancelled else "failed"
        self.log.warning("migration_failed", error=message, resumed=True)

    def _yield_vcpus(self) -> None:
        """The guest's vCPU threads yield the CPU to the migration (vcpupriority.py), unless they
        could not be given their value back or there is nothing to yield (a paused guest)."""
        vm = self.hosted.vm
        if vm is None or self.was_paused or not self._yielding.enabled or self.daemon.nice_error is not None:
            return
        errors = self._yielding.lower(vcpu.thread_id for vcpu in vm.vcpus)
        # What was done, not what was asked: a thread already at the value, or under SCHED_IDLE only.
        self.stats.vcpu_nice = self._yielding.nice if self._yielding.lowered else 0
        self.stats.vcpu_sched_idle = self._yielding.went_idle
        if errors:
            self.log.warning("vcpu_nice_failed", errors=errors)
        if self._yielding.went_idle:
            self.daemon.start_task(self._end_sched_idle)

    async def _end_sched_idle(self) -> None:
        """SCHED_IDLE for `migration.vcpu_sched_idle_s` at most, then the nice value alone: on a
        host whose cores are all busy the guest gets almost no CPU under SCHED_IDLE, and what it
        buys (a migration's setup and small copies, chains of wake-ups) is over well within a
        second; a longer copy is bound by the data plane, where it buys nothing. Ended early
        with the migration (`run`'s finally), and the pause wakes the vCPUs itself."""
        with self._sched_idle_scope:
            await trio.sleep(self._sched_idle_s)
            self._wake_vcpus()

    def _wake_vcpus(self) -> None:
        """The vCPU threads back from SCHED_IDLE (at the nice value): before the pause, so that
        they leave KVM_RUN at once when signalled, however busy the host's cores are, or at the
        end of `migration.vcpu_sched_idle_s`. Idempotent."""
        vm = self.hosted.vm
        vcpus = [] if vm is None else vm.vcpus
        errors = self._yielding.wake(v.thread_id for v in vcpus if v.state is not VcpuRunState.FINISHED)
        if errors:
            self.log.warning("vcpu_nice_failed", errors=errors)

    def _unyield_vcpus(self) -> None:
        vm = self.hosted.vm
        vcpus = [] if vm is None else vm.vcpus  # a released VM's threads have ended
        errors = self._yielding.restore(v.thread_id for v in vcpus if v.state is not VcpuRunState.FINISHED)
        if errors:
            self.log.warning("vcpu_nice_restore_failed", errors=errors)

    async def _resume_here(self) -> None:
        vm = self.hosted.vm
        self._unyield_vcpus()  # before the guest runs again
        if self._vm_record_written is not None:
            with trio.CancelScope(shield=True):
                await self._vm_record_written.wait()  # the "migrating" record goes first
        with trio.CancelScope(shield=True):
            await self._lift_limits("migration ended without cutover")
            if faults.active("source-resume-slow"):
                await trio.sleep(SLOW_RESUME_S)
        if vm is not None and self._paused_at is not None and not self.was_paused:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(vm.resume)
            # What the guest went through although the migration failed: the operator sees it.
            self.stats.downtime_ms = (time.monotonic() - self._paused_at) * 1e3
            self._paused_at = None
        if self.hosted.error is not None:
            self.hosted.state = VmState.FAILED
        else:
            self.hosted.state = VmState.PAUSED if self.was_paused else VmState.RUNNING
        self.daemon.record_vm(self.hosted)

    # ---- phases -------------------------------------------------------------------------

    async def _migrate(self) -> None:
        hosted = self.hosted
        vm = hosted.vm
        assert vm is not None and vm.memory is not None and vm.tracker is not None
        self.log.info("migration_started", downtime_limit_ms=self.options.downtime_limit_ms)
        extents: dict[int, list[tuple[int, int]]] = {}
        await self._set_up(extents)
        self._phase_steps.step("wait_overlapped")
        self.log.info(
            "setup_timeline",
            origin=self._setup_timeline.origin,
            marks_ms=self._setup_timeline.as_ms(),
            link=self.stats.link,
        )
        self._note_progress()  # the target answered and took the streams
        self.stats.setup_ms = (time.monotonic() - self._started) * 1e3
        self._window.lower_event_loop()  # raised for the setup (`run`)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_progress)
                await self._bulk_copy(extents)
                pending = await self._rounds()
                # Before the pause and the records the cutover writes: the one from the setup.
                assert self._vm_record_written is not None
                await self._vm_record_written.wait()
                self.cancel_scope.deadline = math.inf  # a downtime in progress is finished, not cut
                self._progress_scope.deadline = math.inf  # the downtime guard bounds it instead
                self._phase_steps.step("to_downtime")
                with self._window:
                    await self._downtime(pending)
                self._window.log_imports(self.log)
                await self._save_models()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The watcher never fails: what failed is the migration itself, as run() expects it.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _save_models(self) -> None:
        """What this migration taught, kept for a restarted daemon (downtime_models_file.py).
        The VM is the target's already: a state dir that cannot take it is logged, no more."""
        record = self.daemon.downtime_models.to_record(time.time())  # on the loop, where they change
        try:
            await trio.to_thread.run_sync(save_models, Path(self.daemon.config.daemon.state_dir), record)
        except StateDirError as err:
            self.log.warning("downtime_models_not_saved", error=str(err))

    async def _watch_progress(self) -> None:
        """The data threads count; this reads their counters into the stats while they run, so
        bytes, pages remaining and the bandwidth move during a pass, not only after it."""
        meter = RateMeter(weight=0.3)
        last_bytes, last_at = self._sent_bytes(), time.perf_counter()
        while True:
            await trio.sleep(PROGRESS_INTERVAL_S)
            if self.committed:
                # The counts stand as of COMMIT, as the target counts them; later bytes (Close)
                # are no part of the migration's.
                return
            self._update_counters()
            now, sent = time.perf_counter(), self.stats.bytes_sent
            if sent > last_bytes and self.stats.phase in ("bulk", "rounds"):
                # Only intervals that moved bytes: the pauses between rounds (a harvest, the
                # decision) are not the link's speed.
                self._note_progress()
                self.stats.bandwidth_mib_s = meter.add(sent - last_bytes, now - last_at) / MIB
            last_bytes, last_at = sent, now

    def _time_limit_s(self) -> float:
        """timeout_s, or the completion timeout per GiB of RAM if that ends first."""
        limit = self.options.timeout_s
        per_gib = self.options.completion_timeout_per_gib_s
        if per_gib > 0:
            limit = min(limit, per_gib * max(self.hosted.spec.memory_bytes / (1 << 30), 1 / 1024))
        return limit

    def _note_progress(self) -> None:
        """Bytes reached the target: the progress timeout starts again."""
        timeout = self.options.progress_timeout_s
        if timeout > 0 and not self._progress_scope.cancel_called:
            self._progress_scope.deadline = trio.current_time() + timeout

    def set_parameters(self, **changes: float) -> None:
        """migrate-set-parameters: the next batch and the next round's decision use them."""
        old = {k: getattr(self.options, k) for k in changes}
        self.options = replace(self.options, **changes)  # type: ignore[arg-type]
        if "max_bandwidth_mib_s" in changes and self._plane is not None:
            self._plane.limiter.set_rate(self.options.max_bandwidth_mib_s * MIB)
        if "downtime_limit_ms" in changes:
            self.stats.downtime_limit_ms = self.options.downtime_limit_ms
        self.log.info("migration_parameters_changed", old=old, new=changes)

    async def _expect(self, kind: type[E]) -> E:
        """The target's answer within peer.message_timeout_s: the link's own timeout restarts
        with every byte, so a peer trickling its answer would otherwise hold the VM paused."""
        assert self._channel is not None
        timeout = self.daemon.config.peer.message_timeout_s
        try:
            with trio.fail_after(timeout):
                while True:
                    event = await self._channel.receive()
                    # A target offering FINAL_PAGES_ON_CONTROL reports its streams' end with one
                    # Progress, whenever it comes (`_downtime` waits for it, or not).
                    if isinstance(event, Progress) and kind is not Progress:
                        continue
                    if not isinstance(event, kind):
                        raise PeerError(f"expected {kind.__name__} from the peer, got {type(event).__name__}")
                    return event
        except trio.TooSlowError:
            raise PeerError(
                f"no {kind.__name__} from the target within {timeout:g} s (peer.message_timeout_s)"
            ) from None

    def cancel(self, reason: str, by_operator: bool = False) -> None:
        """Stop the migration before COMMIT; the VM resumes (or keeps running) here."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
            self.operator_cancelled = by_operator
        self.cancel_scope.cancel()

    def _sent_bytes(self) -> int:
        control = self._channel.bytes_sent if self._channel is not None else 0
        return control + (self._plane.totals().bytes if self._plane is not None else 0)

    def _update_counters(self) -> None:
        """The stats from the data threads' counters."""
        self.stats.bytes_sent = self._sent_bytes()
        if self._plane is None:
            return
        totals = self._plane.totals()
        self.stats.pages_sent = totals.pages + self._control_counters.pages
        self.stats.zero_pages = totals.zero_pages + self._control_counters.zero_pages
        if self._bulk_pages is not None:
            self.stats.pages_remaining = max(0, self._bulk_pages - totals.pages - totals.zero_pages)

    async def _downtime(self, pending: DirtyPages) -> None:
        """The downtime (R6, in `_downtime_until_loaded`) under the downtime guard, then the
        cutover of DESIGN section 5."""
        hosted = self.hosted
        vm = hosted.vm
        assert vm is not None and vm.tracker is not None and vm.memory is not None
        channel = self._channel
        assert channel is not None
        on_control = self._final_pages_on_control()
        if on_control:
            assert self._plane is not None
            # The streams end now, before the pause (the target reports when it applied all they
            # carried, below): the final pages go on the control connection with the state.
            self._early_end = self._plane.start_end()
        if on_control:
            # What the streams carried is still on its way (a send ends in this host's socket
            # buffers: megabytes per stream), and the target applies it: 3-7 ms measured here
            # after the bulk copy, which was inside the downtime while the guest waited. The
            # record's fsync (1-8 ms here) runs meanwhile; both are done before the pause.
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._record_committing)
                    pending = await self._send_last_harvest(pending)
                    await self._expect(Progress)
            except BaseExceptionGroup as group:
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
            self._phase_steps.step("streams_drained")
        else:
            await self._record_committing()
        self._wake_vcpus()
        # The vCPU threads raised for R6.1's way out of KVM_RUN now, while the guest still runs
        # (the downtime starts at the pause request, `_park`, which lowers them once parked).
        self._pause_raised = self._window.raise_for_pause(self._vcpu_thread_ids())
        self.stats.state = self.stats.phase = "downtime"
        steps = self.stats.downtime_breakdown_ms
        clock = StepClock(steps)
        self._timeline = timeline = Timeline()  # both restarted by `_park` when it asks the vCPUs out
        # The downtime guard: from the pause to COMMIT at most the limit plus the named margin. A
        # target or link that stalls here costs the guest that long, not seconds: the source
        # aborts (the target is told, or finds the link closed) and resumes the VM here.
        guard_ms = self.options.downtime_limit_ms + self.options.downtime_guard_ms
        self.stats.downtime_guard_ms = guard_ms
        try:
            with trio.move_on_after(guard_ms / 1e3) as guard:
                await self._downtime_until_loaded(pending, clock, on_control)
        finally:
            self._window.lower(self._pause_raised)  # when no `_park` took them
            self._pause_raised = set()
        if guard.cancelled_caught:
            waiting_for = next((s for s in self._downtime_steps if s not in steps), "commit")
            self.log.warning("downtime_guard_expired", guard_ms=guard_ms, step=waiting_for)
            raise MigrationFailed(
                f"downtime guard: no COMMIT within {guard_ms:.0f} ms of the pause (limit "
                f"{self.options.downtime_limit_ms:.0f} ms + guard {self.options.downtime_guard_ms:.0f} ms), "
                f"stalled in step {waiting_for!r}; aborted, the VM resumes here"
            )
        channel = self._channel
        assert channel is not None
        # DESIGN 5 step 3: the record that the VM belongs to the target was written before the
        # pause (above): COMMIT leaves at once.
        self.committed = True
        await faults.hold(self.log, "commit")
        if faults.active("source-lose-commit"):
            await channel.aclose()
            raise PeerError("link dropped before COMMIT left (test fault source-lose-commit)")
        await channel.send(Commit(), at_once=True)
        commit_sent_at = time.monotonic()
        timeline.mark("commit_sent")
        # Everything the target receives from this connection has been written: both sides
        # report these bytes (the target counts them as they arrived) and pages (the counters
        # move after each batch went, so the last batch is in them only now).
        self._update_counters()
        running = await self._expect(Running)
        clock.step("commit_to_running")
        self.stats.downtime_gc_ms = round(self._window.gc_ms_so_far(), 3)
        self.stats.downtime_realtime_threads = self._window.raised_threads
        timeline.mark("running_received")
        running_at = time.monotonic()
        assert self._paused_at is not None  # `_park` ran
        self.stats.downtime_ms = downtime_ms = (running_at - self._paused_at) * 1e3
        self.stats.guest_downtime_ms = guest_downtime_ms(
            self._paused_at, commit_sent_at, running_at, running.resume_us, running.reply_us
        )
        predicted_ms = self.stats.predicted_downtime_ms or 0.0
        allocated = vm.memory.allocated_bytes()
        learned = self._model.learn(
            downtime_ms,
            steps,
            self._downtime_bytes,
            allocated,
            predicted_ms,
            target_ram_bytes(allocated, vm.memory.size),
            target_digest_ms=self._target_digest_ms,
            measured_now_ms=sum(self.stats.predicted_downtime_terms_ms.get(k, 0.0) for k in _MEASURED_NOW),
            headroom_ms=self.stats.predicted_downtime_terms_ms.get("headroom_ms", 0.0),
            send_ms_per_gib=self._host_speed.now_ms_per_gib,
        )
        self.stats.downtime_outlier = not learned
        if not learned:
            self.log.warning(
                "downtime_outlier_not_learned", downtime_ms=round(downtime_ms, 1), predicted_ms=round(predicted_ms, 1)
            )
        if downtime_ms > self.options.downtime_limit_ms:
            self.stats.downtime_limit_exceeded = True
            self.log.warning(
                "downtime_limit_exceeded",
                downtime_ms=round(downtime_ms, 1),
                limit_ms=self.options.downtime_limit_ms,
                predicted_ms=round(predicted_ms, 1),
                breakdown_ms=dict(steps),
            )
        self.stats.total_ms = (time.monotonic() - self._started) * 1e3
        self.log.info("downtime_timeline", origin=timeline.origin, marks_ms=timeline.as_ms())
        await self._send_outcome(channel)
        await self._release("completed", timed=True)

    async def _send_last_harvest(self, pending: DirtyPages) -> DirtyPages:
        """The pages of the last harvest on the control connection, behind the streams' end
        markers, while the guest still runs and the streams drain (the source only waited
        there): the downtime then sends only what R6.2 finds, what the guest dirtied since, and
        through code that just ran (the final pages' step was 0.4 ms of cold Python for a dozen
        pages). R3 holds: these pages were reset when harvested, before this read, so a write
        after it is in the final harvest, whose copy comes later on this connection and lands
        last. Returns what is left of `pending` for the downtime: nothing."""
        if not pending.count:
            return pending
        channel = self._channel
        assert channel is not None
        batches = await self._final_batches(pending)
        await channel.send_many(batches, at_once=True)
        self.stats.final_pages_before_pause = pending.count
        return DirtyPages({})

    async def _record_committing(self) -> None:
        """DESIGN 5 step 3, written before the pause rather than between LOADED and COMMIT, so
        that no fsync sits in the downtime. It is conservative: it says "COMMIT may go out, so if
        this daemon dies, ask the target", which is true from here on, and the target resumes
        only on a COMMIT that leaves after it. A migration that ends before COMMIT overwrites it
        (`_fail`); a record left saying "committing" only sends an operator to ask the target,
        who knows (DESIGN 5). If it cannot be written, nothing was paused yet: the migration
        fails and the VM runs on."""
        try:
            await trio.to_thread.run_sync(self._record, "committing")
        except StateDirError as err:
            raise MigrationFailed(f"{err}; the VM keeps running here") from None
        self._commit_recorded = True

    async def _send_outcome(self, channel: PeerChannel) -> None:
        """Close, with the downtime and total time as measured here: only the source can time
        them (it paused and it started), and the target reports the same numbers. Best effort:
        the VM is the target's already."""
        downtime_ms, total_ms, guest_ms = self.stats.downtime_ms, self.stats.total_ms, self.stats.guest_downtime_ms
        close = Close(
            downtime_us=None if downtime_ms is None else round(downtime_ms * 1e3),
            total_us=None if total_ms is None else round(total_ms * 1e3),
            guest_downtime_us=None if guest_ms is None else round(guest_ms * 1e3),
        )
        with trio.move_on_after(1):
            try:
                await channel.send(close)
            except (PeerError, ProtocolError) as err:
                self.log.info("migration_outcome_not_sent", error=str(err))

    def _final_pages_on_control(self) -> bool:
        """Whether the final pages go on the control connection (after every stream ended)
        rather than on the data streams: a final set the prediction expects to be small, a
        target that takes it (FINAL_PAGES_ON_CONTROL), and no backup bitmap (R7: on arm64 the
        ITS's pages follow R6.4, behind the first copy on their stream)."""
        vm = self.hosted.vm
        channel = self._channel
        negotiated = channel.conn.negotiated if channel is not None else None
        return (
            self._plane is not None
            and negotiated is not None
            and FINAL_PAGES_ON_CONTROL in negotiated.capabilities
            and vm is not None
            and vm.tracker is not None
            and not vm.tracker.uses_backup_bitmap
            and self._predicted_final_pages <= CONTROL_FINAL_MAX_PAGES
        )

    async def _downtime_until_loaded(self, pending: DirtyPages, clock: StepClock, on_control: bool) -> None:
        """R6, in order, up to LOADED with the digests compared.

        What R6 lets overlap, overlaps: the pages of R6.2 stream out (in the data threads) while
        the state is saved and the backup bitmap read, which only read guest RAM on x86 and
        write it only in pages the backup bitmap then holds on arm64 (R6.3): those go out after
        it, behind the first copy on their stream, so the newer copy lands last. The state goes
        on the control connection meanwhile; the digest (verify full) reads the final RAM while
        the pages are still on their way. The steps in `downtime_breakdown_ms` are consecutive
        (they add up to the pause): `state_save` and `backup_bitmap` include the page streaming
        they overlapped, `send` is what remained of it afterwards, `digest` what remained of
        the digest after that.

        `on_control`: the streams ended before the pause; the final pages go on the control
        connection: on the event loop as soon as R6.2 found them, before the state save
        (`_stop_and_send_final_pages`, step `final_pages`); from the worker trip of a VM with
        more vCPUs, in the state's write."""
        hosted = self.hosted
        vm = hosted.vm
        assert vm is not None and vm.tracker is not None and vm.memory is not None
        channel = self._channel
        plane = self._plane
        assert channel is not None and plane is not None
        # R6.1-4 in one go, here on the event loop for a small VM (window.py), otherwise in one
        # worker-thread trip, not one per step (every trip waits for the scheduler twice, and
        # on a busy host for long): the pages of R6.2 start streaming between R6.2 and R6.3
        # (the stream threads take jobs from any thread).
        timeline = self._timeline
        sent_before = self._sent_bytes()
        early_end = not vm.tracker.uses_backup_bitmap
        final_sent_early = False  # with `on_control` on the event loop: sent before the save
        on_loop = len(vm.vcpus) <= STATE_WORK_ON_LOOP_MAX_VCPUS
        self._downtime_steps = downtime_steps(on_control and on_loop, self.options.verify == "full")
        if on_loop:
            if not self._park(LOOP_PARK_WAIT_S, clock):
                # A vCPU slow to leave KVM_RUN (preempted, or in a long exit): the rest of the
                # wait off the event loop, which must not stall up to the pause timeout.
                await trio.to_thread.run_sync(self._park, None, clock)
            if on_control:
                dirty = await self._stop_and_send_final_pages(pending, clock)
                final_sent_early = True
                blobs, backup = self._save_state(clock)
                passes: list[Pass] = []
            else:
                dirty, passes, blobs, backup = self._stop_and_save(pending, early_end, clock, on_control)
        else:
            worker_clock = clock.fork()
            dirty, passes, blobs, backup = await trio.to_thread.run_sync(
                self._stop_and_save, pending, early_end, worker_clock, on_control, True
            )
            clock.merge(worker_clock)
            timeline.mark("save_returned")
        # Paused, the state saved, none of it sent (on the event loop with `on_control`, the
        # final pages went out already).
        await faults.hold(self.log, "downtime")
        unsent: list[PageBatch] = []  # final pages that go in the state's write
        if on_control:
            if not final_sent_early:
                unsent = await self._final_batches(dirty)
                timeline.mark("final_pages_read")
            assert self._early_end is not None
            passes.append(self._early_end)
        # After the pause: a held vCPU stays parked (a hold is not a pause), where lifting first
        # would let the held vCPUs dirty at full speed until the pause.
        await self._lift_limits("downtime")
        final_pages = dirty.count + self.stats.final_pages_before_pause
        if backup is not None:
            self.stats.backup_bitmap_pages = backup.count
            # What only the bitmap saw: on arm64 the ITS save's writes (R6.3).
            self.stats.backup_bitmap_added = dirty.union(backup).count - dirty.count
            final_pages += self.stats.backup_bitmap_added
            # All of it again: a page the ITS wrote may have gone out before it did.
            passes.append(plane.start_pages(backup, self.stats.round + 1))
        if not early_end and not on_control:
            passes.append(plane.start_end())  # every stream's end marker, behind its pages
        self.stats.final_pages = final_pages
        self.stats.ring_full_exits = vm.tracker.stats.ring_full_exits
        digest_result: list[bytes] = []

        async def digest_ram() -> None:
            assert vm.memory is not None
            digest_result.append((await trio.to_thread.run_sync(memory_digest, vm.memory)).sha256)

        verify = self.options.verify == "full"
        state = [DeviceState(kind=kind, blob=blob) for kind, blob in blobs]
        self.stats.state_bytes += sum(len(blob) for _, blob in blobs)
        try:
            async with trio.open_nursery() as nursery:
                if verify:
                    nursery.start_soon(digest_ram)  # RAM is final: nothing writes it after R6.4
                    await channel.send_many([*unsent, *state], at_once=True)
                    timeline.mark("state_sent")
                else:
                    # Without a digest nothing is left to wait for: DONE goes in the state's
                    # write, and the target waits for the streams' end markers itself (behind
                    # the last pages, datastream.py rule 4) while these are still on their way.
                    await faults.hold(self.log, "done")
                    await channel.send_many([*unsent, *state, self._done(None, unsent)], at_once=True)
                    timeline.mark("state_and_done_sent")
                for pass_ in passes:
                    await pass_.wait()
                    timeline.mark("pass_sent")
                clock.step("send")
                self._downtime_bytes = self._sent_bytes() - sent_before
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        self._update_counters()
        digest = None
        if verify:
            digest = digest_result[0]
            self.stats.verify_ms = clock.step("digest")
            self.stats.digest = digest.hex()
            timeline.mark("digest_done")
            await faults.hold(self.log, "done")
            await channel.send(self._done(digest), at_once=True)
            timeline.mark("done_sent")
        self.stats.state = self.stats.phase = "cutover"
        loaded = await self._expect(Loaded)
        timeline.mark("loaded_received")
        # What the target's digest cost, as it measured it (an older target does not say).
        self._target_digest_ms = None if loaded.digest_us is None else loaded.digest_us / 1e3
        if faults.active("source-abort-after-loaded"):
            raise MigrationFailed("aborting after LOADED (test fault source-abort-after-loaded)")
        if faults.active("source-vanish-after-loaded"):
            await channel.aclose()
            raise PeerError("dropped the link after LOADED (test fault source-vanish-after-loaded)")
        clock.step("target_load")
        if digest is not None and loaded.digest != digest:
            raise MigrationFailed(
                "memory digest mismatch: the target's RAM differs from the source's; aborted, the VM resumes here"
            )

    async def _stop_and_send_final_pages(self, pending: DirtyPages, clock: StepClock) -> DirtyPages:
        """R6.1-2, then R6.5's pages on the control connection at once, before R6.3 (the
        streams ended before the pause: `_final_pages_on_control`). The target applies them
        while the state is saved here: measured 0.47 ms off the downtime (bench/fixed_cost.py,
        24 migrations each way). R6 allows it: with no backup bitmap R6.2 found every page there
        is to send, nothing writes guest RAM while the vCPUs are parked (R5: the daemon's own
        writes come from their exits), and the x86 state save only reads."""
        channel = self._channel
        assert channel is not None
        final = self._stop_and_harvest(clock, in_worker=False)
        dirty = pending.union(final) if pending.count else final
        batches = await self._final_batches(dirty)
        if batches:
            await channel.send_many(batches, at_once=True)
        clock.step("final_pages")
        self._timeline.mark("final_pages_sent")
        return dirty

    async def _final_batches(self, dirty: DirtyPages) -> list[PageBatch]:
        """The final pages, read from guest RAM now, as the control connection's PageBatches."""
        vm = self.hosted.vm
        channel = self._channel
        assert vm is not None and vm.memory is not None and channel is not None
        assert channel.conn.negotiated is not None
        batch_pages = batch_pages_for(channel.conn.negotiated.max_batch_bytes)
        return await final_batches_of(vm.memory, dirty, self.stats.round + 1, batch_pages, self._control_counters)

    def _done(self, digest: bytes | None, unsent: Sequence[PageBatch] = ()) -> Done:
        """`unsent`: batches that go out in the same write, before it (not counted yet)."""
        channel = self._channel
        assert channel is not None
        return Done(
            pages_total=channel.conn.pages_transferred + sum(b.pages.size + b.zero_pages.size for b in unsent),
            digest=digest,
            verify=self.options.verify,
            rounds=self.stats.round,
        )

    def _stop_and_save(
        self, pending: DirtyPages, early_end: bool, clock: StepClock, on_control: bool = False, in_worker: bool = False
    ) -> tuple[DirtyPages, list[Pass], list[tuple[str, bytes]], DirtyPages | None]:
        """R6.1-4 in order, on the event loop or in a worker thread; R6.2's pages (R6.5) stream
        out from between R6.2 and R6.3 on. `early_end`: their end markers follow them at once.
        `on_control`: the streams have ended; the pages go on the control connection after the
        save."""
        plane = self._plane
        assert plane is not None
        final = self._stop_and_harvest(clock, in_worker)
        dirty = pending.union(final)
        if on_control:
            blobs, backup = self._save_state(clock)
            return dirty, [], blobs, backup
        passes = [plane.start_pages(dirty, self.stats.round + 1)]  # R6.5's pages, out from now on
        if early_end:
            # No backup bitmap (R7): R6.2 found every page there is to send (nothing but the
            # vCPUs writes guest RAM, and they are parked), so the end markers follow them now.
            # The target then has its pages in place while the state is still being saved.
            passes.append(plane.start_end())
        self._timeline.mark("pages_started")
        blobs, backup = self._save_state(clock)
        return dirty, passes, blobs, backup

    def _stop_and_harvest(self, clock: StepClock, in_worker: bool) -> DirtyPages:
        """R6.1-2 in order."""
        vm = self.hosted.vm
        assert vm is not None and vm.tracker is not None
        if in_worker:
            self._timeline.mark("worker_entered")
            self._park(None, clock)
        vm.tracker.count_pages_by_vcpu = False  # the dirty limit's measure ends with the rounds
        clock.step("pause")
        self._timeline.mark("parked")
        final = vm.tracker.collect()  # R6.2: harvest and reset
        clock.step("final_harvest")
        self._timeline.mark("harvested")
        return final

    def _park(self, wait_s: float | None, clock: StepClock) -> bool:
        """R6.1: every vCPU left KVM_RUN and parked; `wait_s`: at most that long, False if not
        all did (None: up to the pause timeout, then VcpuError).

        The downtime begins here, at the first request to leave KVM_RUN (`_paused_at`, and the
        origin of `clock` and the timeline), as QEMU's does (its downtime_start is taken just
        before vm_stop): the Python before it (the guard's scope, the path's choice: 0.05 ms
        measured) ran beside a guest that still ran."""
        vm = self.hosted.vm
        assert vm is not None
        raised, self._pause_raised = self._pause_raised or self._window.raise_for_pause(self._vcpu_thread_ids()), set()
        if self._paused_at is None:
            clock.restart()
            self._timeline.restart()
            self._paused_at = time.monotonic()
        try:
            if wait_s is None:
                vm.pause()
                return True
            return vm.pause_within(wait_s)
        finally:
            self._window.lower(raised)  # parked, or resumed by the failure that follows

    def _vcpu_thread_ids(self) -> set[int]:
        vm = self.hosted.vm
        return set() if vm is None else {v.thread_id for v in vm.vcpus if v.thread_id is not None}

    def _save_state(self, clock: StepClock) -> tuple[list[tuple[str, bytes]], DirtyPages | None]:
        """R6.3-4 in order (R6.2's pages stream out meanwhile)."""
        vm = self.hosted.vm
        assert vm is not None and vm.tracker is not None
        negotiated = self._channel.conn.negotiated if self._channel is not None else None
        flat = (
            negotiated is not None
            and FLAT_MACHINE_STATE in negotiated.capabilities
            and not faults.active("source-map-state")
        )
        blobs = vmstate.capture(self.hosted, self.daemon.kvm, self._timeline, flat)  # R6.3
        self.stats.state_save_ms = clock.step("state_save")
        backup = vm.tracker.collect_backup_bitmap()  # R6.4 (R7)
        clock.step("backup_bitmap")
        return blobs, backup

    async def _release(self, how: str, timed: bool = False) -> None:
        """`timed`: total_ms was taken already (and sent to the target); otherwise (resolved
        later, in doubt or by the operator) the migration ends now."""
        self._record_after("released")
        if not timed:
            self.stats.total_ms = (time.monotonic() - self._started) * 1e3
        self.stats.state = self.stats.phase = how
        self.hosted.state = VmState.MIGRATED
        self.log.info(
            "migration_completed",
            downtime_ms=self.stats.downtime_ms,
            total_ms=self.stats.total_ms,
            rounds=self.stats.round,
            bytes_sent=self.stats.bytes_sent,
        )
        await self.daemon.release_migrated(self.hosted)

    def _record(self, state: str) -> None:
        """Persist the VM's ownership (state_dir), fsync'd: survives a crash of this daemon.

        Raises StateDirError (naming the path) and leaves no file when the disk is full."""
        record = {
            "vm": self.hosted.name,
            "migration_id": self.stats.migration_id,
            "target": self.stats.peer,
            "state": state,
            "at": time.time(),
        }
        write_record(Path(self.daemon.config.daemon.state_dir) / "migrations", self.stats.migration_id, record)

    def _record_after(self, state: str) -> None:
        """A record written after the VM's fate is settled: a failure to write it changes
        nothing of that fate (the "committed" record before it says who owns the VM), so it
        is logged, not raised."""
        try:
            self._record(state)
        except StateDirError as err:
            self.log.error("migration_record_failed", state=state, error=str(err))


# Terms of the prediction that this migration measures itself (not learned): the harvest and the
# state estimate.
_MEASURED_NOW = ("harvest_ms", "state_ms")


def downtime_steps(final_pages_first: bool, digest: bool) -> tuple[str, ...]:
    """The downtime's steps in order, as StepClock names them, for the path this downtime takes:
    the guard's error names the first one that had not finished. `final_pages_first`: the final
    pages go on the control connection ahead of the state save (step `final_pages`); `digest`:
    verify = full. Page streaming overlaps state_save and backup_bitmap (see
    `_downtime_until_loaded`); `send` is what remained of it after them."""
    return (
        "pause",
        "final_harvest",
        *(("final_pages",) if final_pages_first else ()),
        "state_save",
        "backup_bitmap",
        "send",
        *(("digest",) if digest else ()),
        "target_load",
    )


def new_migration_id() -> str:
    return f"m-{int(time.time())}-{os.urandom(4).hex()}"
