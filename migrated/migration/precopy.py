"""The source's pre-copy, between the setup and the downtime (DESIGN section 4, R3): the bulk
copy of the RAM file's data extents, then dirty rounds until the policy's predicted downtime
fits, throttling or dirty-limiting the guest when it says so, and the digest's price timed for a
first migration. A part of `Source` (source.py), which inherits it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import trio

from .. import faults
from ..hosted import HostedVm
from ..kvm.dirty import DirtyPages
from ..pagehash import memory_digest
from ..peer import PeerChannel
from . import dirtylimit, vmstate
from .host import MigrationHost
from .hostspeed import HostSpeed
from .pagestream import PAGE_SIZE
from .policy import (
    THROTTLE_STEPS,
    Costs,
    Decision,
    DigestSample,
    DowntimeModel,
    Policy,
    RateMeter,
    first_round_trip_ms,
    predict_downtime,
)
from .sendstreams import SendStreams
from .source_options import SourceOptions
from .stats import MigrationStats, StepTimes

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

MIB = 1 << 20


class MigrationFailed(Exception):
    """The migration ended without the target running the VM; the source runs it."""


# Digests timed by `_price_digest`, the least counting.
DIGEST_PRICE_SAMPLES = 3

# A round that sends a few pages times the link's latency, not its rate (measured: rounds of
# 20-90 pages made 6 MiB/s of a loopback link; at that rate every later prediction priced
# those pages at 10+ ms): only rounds at least this big update the bandwidth.
BANDWIDTH_SAMPLE_MIN_BYTES = 1 << 20


def target_ram_bytes(source_allocated: int, ram_bytes: int) -> int:
    """What the target's RAM file may hold, for its digest: the data it received plus its
    prefault's lookahead, which is never more than the data received (prefault.py)."""
    return min(ram_bytes, 2 * source_allocated)


class Precopy:
    """What `Source` copies while the guest runs; the attributes are Source's."""

    daemon: MigrationHost
    hosted: HostedVm
    options: SourceOptions
    stats: MigrationStats
    log: FilteringBoundLogger
    _phase_steps: StepTimes
    _plane: SendStreams | None
    _channel: PeerChannel | None
    _started: float
    _last_collect: float
    _bandwidth: RateMeter
    _dirty_rate: RateMeter
    _host_speed: HostSpeed
    _model: DowntimeModel
    _data_pages: int
    _bulk_pages: int | None
    _throttle_step: int
    _dirty_shares: list[float]
    _dirty_limit_exhausted: bool
    _digest_sample: DigestSample | None
    _predicted_final_pages: int

    if TYPE_CHECKING:  # Source's

        def _time_limit_s(self) -> float: ...
        def _note_progress(self) -> None: ...
        def _update_counters(self) -> None: ...

    async def _send_dirty(self, dirty: DirtyPages, round_: int) -> float:
        """Send a dirty set over every stream; returns seconds taken."""
        assert self._plane is not None
        started = time.perf_counter()
        await self._plane.send_pages(dirty, round_)
        self._update_counters()
        self._note_progress()
        return time.perf_counter() - started

    async def _bulk_copy(self, extents: dict[int, list[tuple[int, int]]]) -> None:
        vm = self.hosted.vm
        assert vm is not None and vm.memory is not None
        self.stats.state = self.stats.phase = "bulk"
        assert self._plane is not None
        started = time.perf_counter()
        bytes_before = self.stats.bytes_sent
        memory = vm.memory
        total_pages = sum(r.pages for r in memory.regions)
        # All extents first (`_prepare_bulk`), so that `pages_remaining` counts down from the
        # whole copy, batch by batch (`_update_counters`), instead of standing still within each.
        in_extents = sum(end - first for ranges in extents.values() for first, end in ranges)
        self._bulk_pages = in_extents
        self.stats.pages_remaining = in_extents
        await self._plane.send_extents(extents, 0)
        self._phase_steps.step("bulk_send")
        self._update_counters()
        self._note_progress()
        self._bulk_pages = None
        self._data_pages = in_extents
        # Holes in the memfd were never touched: zero on both sides and not sent at all, so not
        # counted as zero pages (those went as indices, and the target counts them too).
        self.stats.untouched_pages = total_pages - in_extents
        self._update_counters()
        elapsed = time.perf_counter() - started
        self._bandwidth.add(self.stats.bytes_sent - bytes_before, elapsed)
        self._host_speed.add(self.stats.bytes_sent - bytes_before, elapsed)
        self.stats.bandwidth_mib_s = self._bandwidth.rate / MIB
        self.stats.bulk_ms = elapsed * 1e3
        self.stats.bulk_bytes = self.stats.bytes_sent - bytes_before
        self.log.info(
            "bulk_copy_done",
            pages=self.stats.pages_sent,
            zero_pages=self.stats.zero_pages,
            untouched_pages=self.stats.untouched_pages,
            extents=sum(len(ranges) for ranges in extents.values()),
            streams=self._plane.count,
            ms=round(elapsed * 1e3, 1),
            bandwidth_mib_s=round(self.stats.bandwidth_mib_s, 1),
        )

    def _costs(self, state_bytes_guess: int) -> Costs:
        vm = self.hosted.vm
        assert vm is not None and vm.memory is not None and vm.tracker is not None
        model = self._model
        digest_ms = 0.0
        if self.options.verify == "full":
            # What the RAM file holds now, not at the bulk copy: the guest may have grown since.
            allocated = vm.memory.allocated_bytes()
            digest_ms = model.digest_ms(
                allocated, target_ram_bytes(allocated, vm.memory.size), vm.memory.size, self._digest_sample
            )
        return Costs(
            harvest_ms=max(vm.tracker.stats.last_collect_ms, 0.1),
            fixed_ms=model.fixed_ms,
            state_bytes=state_bytes_guess,
            digest_ms=digest_ms,
            rtt_ms=model.round_trip_ms(
                first_round_trip_ms(self._channel.rtt_ms, self._channel.link_rtt_ms()) if self._channel else 0.0
            ),
            state_ms=vmstate.estimate_ms(len(vm.vcpus)),
            pause_ms=model.pause_ms,
            downtime_bandwidth_bytes_s=model.downtime_bandwidth_bytes_s,
            slowdown=model.slowdown(self._host_speed.now_ms_per_gib),
            headroom_ms=model.headroom_ms,
        )

    async def _rounds(self) -> DirtyPages:
        """Dirty rounds until the predicted downtime fits (or the policy says stop)."""
        vm = self.hosted.vm
        assert vm is not None and vm.tracker is not None
        self.stats.state = self.stats.phase = "rounds"
        # The dirty limit's measure, counted from the first round on: when the policy acts after
        # max_rounds, the last round's per-vCPU rates are there already.
        vm.tracker.count_pages_by_vcpu = self.options.on_no_convergence == "dirty-limit"
        if self.options.verify == "full" and not self._model.learned:
            await self._price_digest()
        while True:
            # Built each round: `migration set` may have changed the limit since the last one.
            policy = Policy(
                self.options.downtime_limit_ms,
                self.options.max_rounds,
                self._time_limit_s(),
                self.options.on_no_convergence,
            )
            if vm.tracker.collect_is_small():
                # A few pages (a quiet guest, the last round): a worker's round trip would cost
                # more than the harvest, twice a thread wake-up on a busy host.
                pending = vm.tracker.collect()
            else:
                pending = await trio.to_thread.run_sync(vm.tracker.collect)
            self._phase_steps.step("collect")
            now = time.perf_counter()
            round_s = now - self._last_collect
            self._dirty_rate.add(pending.count, round_s)
            self._last_collect = now
            self.stats.dirty_rate_mib_s = self._dirty_rate.rate * PAGE_SIZE / MIB
            self.stats.pages_remaining = pending.count
            estimate = predict_downtime(
                pending.count,
                self._dirty_rate.rate,
                self._bandwidth.rate,
                self._costs(vmstate.estimate_bytes(len(vm.vcpus))),
            )
            self.stats.predicted_downtime_ms = estimate.total_ms
            self.stats.predicted_downtime_terms_ms = estimate.terms_ms()
            self.stats.send_ms_per_gib = round(self._host_speed.now_ms_per_gib, 1)
            decision = policy.decide(
                estimate,
                self.stats.round,
                time.monotonic() - self._started,
                self._throttle_step,
                self._dirty_limit_exhausted,
            )
            self._phase_steps.step("decide")
            if decision is Decision.STOP_AND_COPY:
                self.log.info(
                    "converged",
                    round=self.stats.round,
                    pages=pending.count,
                    predicted_downtime_ms=round(estimate.total_ms, 2),
                    handshake_rtt_ms=round(self._channel.rtt_ms, 3) if self._channel else None,
                    link_rtt_ms=self._channel.link_rtt_ms() if self._channel else None,
                )
                self._predicted_final_pages = estimate.pages
                return pending
            if decision is Decision.GIVE_UP:
                raise MigrationFailed(
                    f"did not converge after {self.stats.round} rounds: predicted downtime "
                    f"{estimate.total_ms:.0f} ms over the limit {self.options.downtime_limit_ms:.0f} ms "
                    f"(dirty rate {self.stats.dirty_rate_mib_s:.0f} MiB/s, bandwidth "
                    f"{self.stats.bandwidth_mib_s:.0f} MiB/s); the VM keeps running here"
                )
            if decision is Decision.THROTTLE_MORE:
                self._throttle_step += 1
                share = THROTTLE_STEPS[self._throttle_step]
                await trio.to_thread.run_sync(vm.set_throttle, share)
                self.stats.throttle_percent = round(share * 100)
                self.log.info(
                    "throttling", percent=self.stats.throttle_percent, predicted_downtime_ms=round(estimate.total_ms, 1)
                )
            if decision is Decision.LIMIT_DIRTY:
                await self._limit_dirty(estimate.total_ms - estimate.transfer_ms, round_s)
            self.stats.round += 1
            if faults.active("source-stall-rounds"):
                await trio.sleep(0.2)
            bytes_before = self.stats.bytes_sent
            seconds = await self._send_dirty(pending, self.stats.round)
            self._phase_steps.step("round_send")
            if seconds > 0 and self.stats.bytes_sent - bytes_before >= BANDWIDTH_SAMPLE_MIN_BYTES:
                self._bandwidth.add(self.stats.bytes_sent - bytes_before, seconds)
                self._host_speed.add(self.stats.bytes_sent - bytes_before, seconds)
                self.stats.bandwidth_mib_s = self._bandwidth.rate / MIB

    async def _price_digest(self) -> None:
        """A path not measured yet, with verify = full: one digest of the RAM, timed now (after
        the bulk copy, before the first downtime decision), prices both sides' digests. The
        defaults it replaces priced the boot-sector guest's at 9 ms against 4 measured, so that
        a first migration under a 30 ms limit never converged and nothing was ever learned."""
        vm = self.hosted.vm
        assert vm is not None and vm.memory is not None
        memory = vm.memory

        def timed_digest() -> DigestSample:
            # The least of a few: the guest runs meanwhile, and a sample its vCPU threads (their
            # exits take the GIL) or the host took a core from is not what a digest costs with
            # the vCPUs parked (one read 96 ms here where the downtime's took 2-4).
            data_bytes = memory.allocated_bytes()
            samples = []
            for _ in range(DIGEST_PRICE_SAMPLES):
                started = time.perf_counter()
                memory_digest(memory)
                samples.append((time.perf_counter() - started) * 1e3)
            return DigestSample(min(samples), data_bytes)

        self._digest_sample = sample = await trio.to_thread.run_sync(timed_digest)
        self._phase_steps.step("digest_priced")
        self.log.info("digest_priced", ms=round(sample.ms, 2), data_mib=round(sample.data_bytes / MIB, 1))

    async def _limit_dirty(self, other_costs_ms: float, round_s: float) -> None:
        """Policy "dirty-limit": each vCPU's quota and held share for the next round, from what
        each one's ring took in over the last round (dirtylimit.py)."""
        vm = self.hosted.vm
        assert vm is not None and vm.tracker is not None
        if vm.dirty_tracking != "ring":
            raise MigrationFailed(
                "on_no_convergence = dirty-limit needs the dirty rings' per-vCPU counts, and this VM "
                "tracks dirty pages with the bitmap; use throttle; the VM keeps running here"
            )
        vcpus = len(vm.vcpus)
        shares = self._dirty_shares or [0.0] * vcpus
        rates = dirtylimit.rates_bytes_s(vm.tracker.pages_by_vcpu, vcpus, round_s)
        budget = dirtylimit.dirty_budget_bytes_s(
            self._bandwidth.rate, self.options.downtime_limit_ms, other_costs_ms, round_s, vcpus
        )
        plan = dirtylimit.plan(rates, shares, budget)
        await trio.to_thread.run_sync(vm.set_vcpu_throttle, plan.shares)
        for old, limit in zip(shares, plan.vcpus, strict=True):
            if old == limit.share:
                continue
            event = "dirty_limit_set" if not old else "dirty_limit_changed" if limit.share else "dirty_limit_lifted"
            self.log.info(
                event,
                round=self.stats.round,
                demand_mib_s=round(limit.demand_bytes_s / MIB, 1),
                budget_mib_s=round(budget / MIB, 1),
                **dirtylimit.describe(limit),
            )
        self._dirty_shares = plan.shares
        self._dirty_limit_exhausted = plan.exhausted
        self.stats.dirty_limits = [dirtylimit.describe(v) for v in plan.limited]
        self.stats.dirty_limited_vcpus = sorted(set(self.stats.dirty_limited_vcpus) | {v.vcpu for v in plan.limited})
        self.stats.dirty_limit_budget_mib_s = round(budget / MIB, 1)

    async def _lift_limits(self, reason: str) -> None:
        """End the throttle or the dirty limit in force: never left on after the migration."""
        vm = self.hosted.vm
        if vm is not None and vm.tracker is not None:
            vm.tracker.count_pages_by_vcpu = False
        if vm is None or not vm.throttle_share:
            return
        await trio.to_thread.run_sync(vm.set_throttle, 0.0)
        if any(self._dirty_shares):
            limited = [i for i, share in enumerate(self._dirty_shares) if share]
            self.log.info("dirty_limits_lifted", reason=reason, vcpus=limited)
        self._dirty_shares = []
