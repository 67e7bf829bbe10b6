"""When to stop the vCPUs: pure convergence maths, no I/O (DESIGN section 4).

The prediction counts everything the downtime contains, not only the pages: the pages in hand
plus those the guest dirties before the vCPUs stop, the final harvest, state save, state and page
transfer, the digest (when verifying), state restore on the target, and two round trips (DONE ->
LOADED, COMMIT -> RUNNING). QEMU and Cloud Hypervisor count only the pages and overshoot.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PAGE_SIZE = 4096


@dataclass(frozen=True)
class DowntimeEstimate:
    pages: int
    transfer_ms: float
    harvest_ms: float
    state_ms: float
    verify_ms: float
    round_trips_ms: float

    @property
    def total_ms(self) -> float:
        return self.transfer_ms + self.harvest_ms + self.state_ms + self.verify_ms + self.round_trips_ms


@dataclass(frozen=True)
class Costs:
    """What the downtime costs besides the pages, measured or estimated by the caller."""

    harvest_ms: float  # one final collection (the tracker's last)
    fixed_ms: float  # pause, state save and restore, resume, thread hops: DowntimeModel learns it
    state_bytes: int
    digest_ms: float  # 0 when verify = "off"
    rtt_ms: float


def predict_downtime(
    pending_pages: int, dirty_pages_per_s: float, bandwidth_bytes_s: float, costs: Costs
) -> DowntimeEstimate:
    """Downtime if the vCPUs stopped now, with `pending_pages` collected and not yet sent."""
    bandwidth = max(bandwidth_bytes_s, 1.0)
    # Between the last collection and the pause the guest keeps writing for about one harvest.
    extra = dirty_pages_per_s * costs.harvest_ms / 1e3
    pages = pending_pages + int(extra)
    transfer_ms = (pages * PAGE_SIZE + costs.state_bytes) / bandwidth * 1e3
    return DowntimeEstimate(
        pages=pages,
        transfer_ms=transfer_ms,
        harvest_ms=costs.harvest_ms,
        state_ms=costs.fixed_ms,
        verify_ms=costs.digest_ms,
        round_trips_ms=2 * costs.rtt_ms,
    )


class Decision(enum.Enum):
    ANOTHER_ROUND = "another-round"
    STOP_AND_COPY = "stop-and-copy"
    THROTTLE_MORE = "throttle-more"  # another round, with the guest's vCPUs slowed further
    GIVE_UP = "give-up"  # abort, the VM keeps running on the source


# The share of each throttle period the vCPUs are kept paused, one step per round.
THROTTLE_STEPS = (0.3, 0.5, 0.7, 0.9, 0.99)


@dataclass(frozen=True)
class Policy:
    downtime_limit_ms: float
    max_rounds: int
    timeout_s: float
    on_no_convergence: str  # "abort" | "force-downtime" | "throttle"

    def decide(self, estimate: DowntimeEstimate, rounds: int, elapsed_s: float, throttle_step: int = -1) -> Decision:
        """`throttle_step`: index into THROTTLE_STEPS in force now (-1: not throttling)."""
        if estimate.total_ms <= self.downtime_limit_ms:
            return Decision.STOP_AND_COPY
        if elapsed_s >= self.timeout_s:
            return Decision.STOP_AND_COPY if self.on_no_convergence == "force-downtime" else Decision.GIVE_UP
        if rounds >= self.max_rounds:
            if self.on_no_convergence == "force-downtime":
                return Decision.STOP_AND_COPY
            if self.on_no_convergence == "throttle" and throttle_step + 1 < len(THROTTLE_STEPS):
                return Decision.THROTTLE_MORE
            return Decision.GIVE_UP
        return Decision.ANOTHER_ROUND


class RateMeter:
    """An exponentially weighted rate (units per second) from (amount, seconds) samples."""

    def __init__(self, weight: float = 0.5) -> None:
        self._weight = weight
        self.rate = 0.0
        self.samples = 0

    def add(self, amount: float, seconds: float) -> float:
        if seconds <= 0:
            return self.rate
        sample = amount / seconds
        self.rate = sample if self.samples == 0 else (self._weight * sample + (1 - self._weight) * self.rate)
        self.samples += 1
        return self.rate


GIB = 1 << 30


class DowntimeModel:
    """What a downtime costs on this daemon besides moving pages, learned from each migration.

    The fixed part (pause, state save and restore, resume, the thread hops between them) and the
    digest rate are measured by every completed migration and averaged, so the next prediction
    counts what this host really spends instead of a constant.
    """

    def __init__(self, fixed_ms: float = 10.0, digest_ms_per_gib: float = 70.0) -> None:
        self.fixed = RateMeter()
        self.fixed.rate = fixed_ms
        self.digest = RateMeter()
        self.digest.rate = digest_ms_per_gib
        self.learned = 0

    @property
    def fixed_ms(self) -> float:
        return self.fixed.rate

    def digest_ms(self, data_bytes: int) -> float:
        """Both sides' digests, one after the other (the target's starts on DONE)."""
        return 2 * self.digest.rate * data_bytes / GIB

    # A digest of a mostly empty guest is all fixed cost (holes, SHA-256 of the hash vector): a
    # rate per GiB is learned only from digests that read at least this much data.
    LEARN_DIGEST_FROM_BYTES = 64 << 20

    def learn(self, downtime_ms: float, send_ms: float, digest_ms: float, data_bytes: int) -> None:
        if digest_ms > 0 and data_bytes >= self.LEARN_DIGEST_FROM_BYTES:
            self.digest.add(digest_ms, data_bytes / GIB)
        # The target's digest is taken to cost what the source's did.
        self.fixed.add(max(0.0, downtime_ms - send_ms - 2 * digest_ms), 1.0)
        self.learned += 1
