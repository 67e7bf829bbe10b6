"""A migration's progress and outcome, as `migration status` shows it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MigrationStats:
    migration_id: str
    vm: str
    role: str  # "source" | "target"
    peer: str
    state: str = "setup"  # setup, bulk, rounds, downtime, cutover, completed, failed, aborted,
    # cancelled, in-doubt
    phase: str = "setup"
    started_at: float = field(default_factory=time.time)
    round: int = 0
    bytes_sent: int = 0
    pages_sent: int = 0
    zero_pages: int = 0  # all-zero pages sent as indices only (both sides count the same)
    untouched_pages: int = 0  # never written on the source (holes in its RAM file): not sent at all
    pages_remaining: int = 0
    dirty_rate_mib_s: float = 0.0
    bandwidth_mib_s: float = 0.0
    predicted_downtime_ms: float | None = None
    # The prediction term by term (pages and state over the link, harvest, state, digest, round
    # trips, the learned fixed cost of this path): what the decision to stop was made of.
    predicted_downtime_terms_ms: dict[str, float] = field(default_factory=dict)
    # The last sends' pace (hostspeed.py): against the pace the learned costs came with, the
    # slowdown the prediction's `slower_host_ms` term counts.
    send_ms_per_gib: float = 0.0
    total_ms: float | None = None
    setup_ms: float | None = None
    bulk_ms: float | None = None
    bulk_bytes: int = 0
    downtime_breakdown_ms: dict[str, float] = field(default_factory=dict)
    # The steps outside the downtime, consecutive, in ms: source, from the `migrate` request to
    # the downtime ("to_downtime"); target, from the accepted connection to LOADED. Work that
    # ran beside them is named "overlapped.*" (StepTimes).
    phase_steps_ms: dict[str, float] = field(default_factory=dict)
    apply_ms: float = 0.0  # target: writing received pages into guest RAM
    downtime_ms: float | None = None  # source: from the pause until RUNNING arrived
    # From the pause until the target resumed the vCPUs, as the source places that on its clock
    # (Running's resume_us and half the remaining round trip): what the guest saw.
    guest_downtime_ms: float | None = None
    verify_ms: float | None = None
    state_save_ms: float | None = None
    state_bytes: int = 0
    # The last pass's pages (data and zero), as both sides count them; the source sends those of
    # its last harvest before the pause where the streams ended first (`final_pages_before_pause`).
    final_pages: int = 0
    final_pages_before_pause: int = 0
    # Source: how its link reached the target: "warm" (an idle link from warmlinks.py), "fresh"
    # (connected for this migration), "fresh-after-warm" (the warm link had died); set at ACCEPT.
    link: str = ""
    dirty_tracking: str = ""
    memory_backing: str = ""  # what holds this side's guest RAM: memfd, shmem-huge, hugetlbfs
    ram_from_reserve: bool = False  # target: its RAM file came from the daemon's reserve (ramreserve.py)
    # Target: "used" when the VM was built from the daemon's warm shell (vmshell.py); "mismatch",
    # "none" (not ready) or "off" when it was built from scratch.
    vm_shell: str = ""
    backup_bitmap: str = ""
    backup_bitmap_pages: int = 0
    backup_bitmap_added: int = 0  # pages only the backup bitmap reported
    ring_full_exits: int = 0
    downtime_limit_ms: float = 0.0
    downtime_limit_exceeded: bool = False  # a completed migration whose measured downtime broke the limit
    downtime_guard_ms: float = 0.0  # the source aborts and resumes if COMMIT is not out this long after the pause
    downtime_gc_ms: float = 0.0  # the garbage collector's pauses inside the downtime (window.py)
    downtime_realtime_threads: int = 0  # threads at SCHED_FIFO for the downtime (0: none, or not allowed)
    vcpu_nice: int = 0  # the nice value the guest's vCPU threads had while it migrated out (0: left alone)
    vcpu_sched_idle: bool = False  # the guest's vCPU threads ran under SCHED_IDLE (migration.vcpu_sched_idle_s)
    downtime_outlier: bool = False  # measured far beyond the prediction: reported, not learned
    throttle_percent: int = 0  # share of the time the vCPUs were held paused (policy "throttle")
    # Policy "dirty-limit": the vCPUs held to a dirty-rate quota in the last round (vcpu,
    # limit_mib_s, dirty_rate_mib_s, throttle_percent), and every vCPU limited at some point.
    dirty_limits: list[dict[str, float | int]] = field(default_factory=list)
    dirty_limited_vcpus: list[int] = field(default_factory=list)
    dirty_limit_budget_mib_s: float = 0.0  # the total dirty rate the quotas shared
    error: str | None = None
    digest: str | None = None

    def as_dict(self) -> dict[str, Any]:
        # `round` is the round in progress; `rounds` is how many dirty rounds ran (the same
        # number, under the name operators read in the final report).
        return {**asdict(self), "rounds": self.round}


@dataclass(frozen=True)
class FinishedMigration:
    """What stays of an incoming migration once its connection ended: the numbers only."""

    stats: MigrationStats


class StepTimes:
    """Times consecutive steps into a stats dict (name -> ms); a step that comes again (a
    round's) adds to its earlier time. Work that ran beside the steps is `add`ed under its own
    name ("overlapped.*"): it is no part of the consecutive sum."""

    def __init__(self, steps: dict[str, float]) -> None:
        self.steps = steps
        self._last = time.perf_counter()

    def step(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = round(self.steps.get(name, 0.0) + (now - self._last) * 1e3, 3)
        self._last = now

    def add(self, name: str, started: float) -> None:
        """Work that ran beside the steps, from `started` (perf_counter) until now."""
        self.steps[name] = round((time.perf_counter() - started) * 1e3, 3)
