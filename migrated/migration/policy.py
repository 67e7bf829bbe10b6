"""When to stop the vCPUs: pure convergence maths, no I/O (DESIGN section 4).

The prediction counts everything the downtime contains, not only the pages: the pages in hand
plus those the guest dirties before the vCPUs stop, the final harvest, state save, state and page
transfer, the digest (when verifying), state restore on the target, and two round trips (DONE ->
LOADED, COMMIT -> RUNNING). QEMU and Cloud Hypervisor count only the pages and overshoot.
"""

from __future__ import annotations

import enum
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

PAGE_SIZE = 4096


@dataclass(frozen=True)
class DowntimeEstimate:
    pages: int
    transfer_ms: float
    harvest_ms: float
    state_ms: float  # saving and restoring the vCPU and device state, estimated from its size
    verify_ms: float
    round_trips_ms: float
    learned_fixed_ms: float = 0.0  # the rest of the path, learned from past migrations to this peer
    # The learned and estimated terms again times (slowdown - 1): the host is slower now than
    # when they were learned (HostSpeed).
    slower_host_ms: float = 0.0
    headroom_ms: float = 0.0  # what the learned costs vary by (DowntimeModel.headroom_ms)

    @property
    def total_ms(self) -> float:
        return (
            self.transfer_ms
            + self.harvest_ms
            + self.state_ms
            + self.verify_ms
            + self.round_trips_ms
            + self.learned_fixed_ms
            + self.slower_host_ms
            + self.headroom_ms
        )

    def terms_ms(self) -> dict[str, float]:
        """The prediction term by term, as `migration status` shows it."""
        terms = {k: round(v, 2) for k, v in asdict(self).items() if k != "pages"}
        return {**terms, "total_ms": round(self.total_ms, 2)}


@dataclass(frozen=True)
class Costs:
    """What the downtime costs besides the pages, measured or estimated by the caller."""

    harvest_ms: float  # one final collection (the tracker's last)
    fixed_ms: float  # pause, resume, the target's load, thread hops: DowntimeModel learns it
    state_bytes: int
    digest_ms: float  # 0 when verify = "off"
    rtt_ms: float
    state_ms: float = 0.0  # state save and restore, estimated from the vCPU count
    pause_ms: float = 0.0  # stopping every vCPU: DowntimeModel learns it
    downtime_bandwidth_bytes_s: float = 0.0  # the downtime's send rate, learned (0: not yet)
    slowdown: float = 1.0  # how much slower the host is now than when the costs were learned
    headroom_ms: float = 0.0  # the spread of the learned costs, at the speed they were learned


def predict_downtime(
    pending_pages: int, dirty_pages_per_s: float, bandwidth_bytes_s: float, costs: Costs
) -> DowntimeEstimate:
    """Downtime if the vCPUs stopped now, with `pending_pages` collected and not yet sent."""
    # The downtime's own send rate, where one was learned, is what the final send gets (the
    # target applies and digests while it receives); the rounds' rate otherwise.
    bandwidth = max(bandwidth_bytes_s, 1.0)
    if costs.downtime_bandwidth_bytes_s > 0:
        bandwidth = min(bandwidth, costs.downtime_bandwidth_bytes_s)
    # Between the last collection and the moment every vCPU has parked the guest keeps writing:
    # one harvest, and the pause itself.
    extra = dirty_pages_per_s * (costs.harvest_ms + costs.pause_ms) / 1e3
    pages = pending_pages + int(extra)
    transfer_ms = (pages * PAGE_SIZE + costs.state_bytes) / bandwidth * 1e3
    # The pages' send and the harvest were measured in this migration, at the host's speed now;
    # every other term was learned or estimated at another time, and scales with the host.
    learned = costs.state_ms + costs.digest_ms + 2 * costs.rtt_ms + costs.fixed_ms + costs.pause_ms
    slowdown = max(1.0, costs.slowdown)
    return DowntimeEstimate(
        pages=pages,
        transfer_ms=transfer_ms,
        harvest_ms=costs.harvest_ms,
        state_ms=costs.state_ms,
        verify_ms=costs.digest_ms,
        round_trips_ms=2 * costs.rtt_ms,
        learned_fixed_ms=costs.fixed_ms + costs.pause_ms,
        slower_host_ms=(slowdown - 1.0) * learned,
        headroom_ms=slowdown * max(0.0, costs.headroom_ms),
    )


class Decision(enum.Enum):
    ANOTHER_ROUND = "another-round"
    STOP_AND_COPY = "stop-and-copy"
    THROTTLE_MORE = "throttle-more"  # another round, with the guest's vCPUs slowed further
    GIVE_UP = "give-up"  # abort, the VM keeps running on the source
    LIMIT_DIRTY = "limit-dirty"  # another round, with the fastest-dirtying vCPUs held to quotas (dirtylimit.py)


# The share of each throttle period the vCPUs are kept paused, one step per round.
THROTTLE_STEPS = (0.3, 0.5, 0.7, 0.9, 0.99)


@dataclass(frozen=True)
class Policy:
    downtime_limit_ms: float
    max_rounds: int
    timeout_s: float
    on_no_convergence: str  # "abort" | "force-downtime" | "throttle" | "dirty-limit"

    def decide(
        self,
        estimate: DowntimeEstimate,
        rounds: int,
        elapsed_s: float,
        throttle_step: int = -1,
        dirty_limit_exhausted: bool = False,
    ) -> Decision:
        """`throttle_step`: index into THROTTLE_STEPS in force now (-1: not throttling).
        `dirty_limit_exhausted`: the dirty limit holds every vCPU over its quota at its maximum."""
        if estimate.total_ms <= self.downtime_limit_ms:
            return Decision.STOP_AND_COPY
        if elapsed_s >= self.timeout_s:
            return Decision.STOP_AND_COPY if self.on_no_convergence == "force-downtime" else Decision.GIVE_UP
        if rounds >= self.max_rounds:
            if self.on_no_convergence == "force-downtime":
                return Decision.STOP_AND_COPY
            if self.on_no_convergence == "throttle" and throttle_step + 1 < len(THROTTLE_STEPS):
                return Decision.THROTTLE_MORE
            if self.on_no_convergence == "dirty-limit" and not dirty_limit_exhausted:
                return Decision.LIMIT_DIRTY
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


@dataclass(frozen=True)
class DigestSample:
    """A digest of the source's RAM timed in this migration: `ms` for `data_bytes` allocated."""

    ms: float
    data_bytes: int


def is_outlier(measured_ms: float, predicted_ms: float) -> bool:
    """A downtime far beyond its prediction was stalled (a peer stopped, a link that froze, a host
    swapping), not a cost of this path: it is reported, never learned. The slack keeps a fast
    path's small absolute misses (a 20 ms prediction measured at 70) learnable."""
    return measured_ms > OUTLIER_FACTOR * predicted_ms + OUTLIER_SLACK_MS


OUTLIER_FACTOR = 3.0
OUTLIER_SLACK_MS = 100.0


# What a first migration to a peer assumes, until one was learned: measured with the boot-sector
# guest between two daemons on this 2-core host, bench/fixed_cost.py and bench/vs_qemu.py: pause
# 0.2-2.5 ms; since the downtime lost its fsyncs and thread hops (no record between LOADED and
# COMMIT; no worker trip at all for VMs of up to 4 vCPUs) the whole downtime is 2.9-4.6 ms quiet,
# up to 17 ms on a loaded host: 8 ms is a first guess with room, not a measured mean. Higher defaults would keep a first migration from ever completing under a tight
# limit (with FIRST_MISS_MS a 30 ms limit never converged at 15 ms here: predicted 31-44 ms for
# 7-14 ms measured), and with it the learning of what the path costs.
FIRST_FIXED_MS = 8.0
FIRST_PAUSE_MS = 2.0

# A cutover round trip beyond the link's own (the kernel's least RTT sample): the peer's event loop
# waking for the message and answering, both at the window's priority (window.py). Measured here:
# commit_to_running 0.5-0.8 ms median at load 3-8 (bench/fixed_cost.py), target resume included.
CUTOVER_WAKEUPS_MS = 1.0


def first_round_trip_ms(handshake_ms: float, link_ms: float | None) -> float:
    """One cutover round trip before any was learned: the handshake's, or the link's own (the
    kernel's least sample, peer.py) plus the wake-ups if that is lower. The handshake's round trip ran at the normal priority on a new
    connection (the target taking it up, busy host: 2-24 ms measured here), the cutover's runs
    between raised event loops; the link's latency, which the kernel measures, is in both."""
    if link_ms is None:
        return handshake_ms
    return min(handshake_ms, link_ms + CUTOVER_WAKEUPS_MS)


# Until a path has been measured, its predictions are taken to fall short by this much: first
# migrations between two fresh daemons here (bench/downtime.py, 512 MiB, 50 and 100 ms limits)
# measured 4-12 ms over their prediction on a quiet host, up to 37 ms beside a CPU hog.
FIRST_MISS_MS = 10.0
# A digest costs more than its data per GiB: the first digests of a 512 MiB guest holding ~20 MiB
# of data took 12-19 ms on each side here (quiet; bench/downtime.py), for ~1.5 ms of data at the
# default rate. Counted per side, per GiB of guest RAM, until the path has been measured (then
# the learned fixed rest and the miss hold it).
FIRST_DIGEST_MS_PER_GIB_RAM = 30.0

# The sends' pace (hostspeed.py) is taken to be no faster than 20 GiB/s, above any link here: a
# pace learned from a send that timed almost nothing would make every later one look slow. A
# host more than MAX_SLOWDOWN times slower than when the costs were learned is taken to be that
# much slower: the learned costs would no longer say anything.
PACE_FLOOR_MS_PER_GIB = 50.0
MAX_SLOWDOWN = 8.0


class RobustCost:
    """One cost term learned from the last WINDOW accepted samples, robust both ways.

    The estimate is the upper quartile of the window (samples weighted by age), or the smaller of
    the last two samples if that is higher. One slow sample alone moves neither: it is noise, and
    the migrations after it are not made cautious by it. Two slow samples in a row are a host that
    became slower, seen at once. The whole estimate fades back to the default with the age of the
    newest sample, so a host that was slow an hour ago is not taken to be slow for ever.
    """

    WINDOW = 8
    QUANTILE = 0.75
    # The upper quartile of two or three samples is their maximum, so one slow sample would
    # decide: below this many samples the (lower) median is taken instead.
    QUARTILE_FROM_SAMPLES = 4

    def __init__(self, default: float, half_life_s: float, clock: Callable[[], float], bound: float) -> None:
        self.default = default
        self._half_life_s = half_life_s
        self._clock = clock
        self._bound = bound
        self._samples: deque[tuple[float, float]] = deque(maxlen=self.WINDOW)

    def add(self, value: float) -> None:
        self._samples.append((self._clock(), min(max(0.0, value), self._bound)))

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def learned(self) -> bool:
        return bool(self._samples)

    def _weight(self, at: float) -> float:
        return float(0.5 ** (max(0.0, self._clock() - at) / self._half_life_s))

    def _quantile(self, quantile: float) -> float:
        ranked = sorted((value, self._weight(at)) for at, value in self._samples)
        total = sum(weight for _, weight in ranked)
        reached = 0.0
        for value, weight in ranked:
            reached += weight
            if reached >= quantile * total:
                return value
        return ranked[-1][0]

    def _upper_quartile(self) -> float:
        return self._quantile(self.QUANTILE if len(self._samples) >= self.QUARTILE_FROM_SAMPLES else 0.5)

    def median(self) -> float:
        """The typical sample (age-weighted), unfaded; the default before any sample."""
        return self._quantile(0.5) if self._samples else self.default

    def value(self) -> float:
        if not self._samples:
            return self.default
        recent = min(value for _, value in list(self._samples)[-2:])
        learned = max(self._upper_quartile(), recent)
        newest_at = self._samples[-1][0]
        return self.default + (learned - self.default) * self._weight(newest_at)

    def age_s(self) -> float:
        return math.inf if not self._samples else self._clock() - self._samples[-1][0]

    def to_record(self) -> list[list[float]]:
        """The samples as [age in seconds, value], oldest first: ages survive a restart, the
        clock's readings (monotonic) do not."""
        now = self._clock()
        return [[round(max(0.0, now - at), 3), value] for at, value in self._samples]

    def load_record(self, samples: object, more_age_s: float, what: str) -> None:
        """Samples from `to_record`, each `more_age_s` older (the time the daemon was down).
        ValueError naming `what` if they are not what `to_record` writes."""
        if not isinstance(samples, list) or len(samples) > self.WINDOW:
            raise ValueError(f"{what}: a list of at most {self.WINDOW} samples expected")
        now = self._clock()
        loaded: list[tuple[float, float]] = []
        for sample in samples:
            if (
                not isinstance(sample, list)
                or len(sample) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in sample)
                or not all(math.isfinite(x) for x in sample)
                or sample[0] < 0
            ):
                raise ValueError(f"{what}: each sample is [age_s >= 0, value], finite numbers; got {sample!r}")
            loaded.append((now - sample[0] - more_age_s, min(max(0.0, float(sample[1])), self._bound)))
        self._samples.clear()
        self._samples.extend(loaded)


class DowntimeModel:
    """What a downtime to one peer costs, learned from the completed migrations to that peer.

    Learned from each completed migration's measured steps, each term on its own (RobustCost):
    the pause (every vCPU parked), the rate of the final send (slower than the rounds': the
    target applies and digests meanwhile), the source's digest rate, the target's digest rate and
    load (as the target reports them in LOADED; estimated from the source's digest rate when an
    older target does not), and the fixed rest (state, resume, thread hops, the link's lag).
    Rules that keep one bad migration from poisoning every later one: a sample is never taken
    from a failed migration or from an outlier (`is_outlier`); each term is bounded
    (MAX_FIXED_MS); one slow sample does not move an estimate; and estimates fade back to the
    defaults with a half-life.
    """

    MAX_FIXED_MS = 1000.0
    MAX_DIGEST_MS_PER_GIB = 10_000.0
    HALF_LIFE_S = 1800.0
    # A digest of a mostly empty guest is all fixed cost (holes, SHA-256 of the hash vector): a
    # rate per GiB is learned only from digests that read at least this much data.
    LEARN_DIGEST_FROM_BYTES = 64 << 20
    # A send rate is learned only from final sends big enough to be more than their latency.
    LEARN_SEND_FROM_BYTES = 4 << 20

    def __init__(
        self,
        fixed_ms: float = FIRST_FIXED_MS,
        digest_ms_per_gib: float = 70.0,
        pause_ms: float = FIRST_PAUSE_MS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        def term(default: float, bound: float) -> RobustCost:
            return RobustCost(default, self.HALF_LIFE_S, clock, bound)

        self.fixed = term(fixed_ms, self.MAX_FIXED_MS)
        self.pause = term(pause_ms, self.MAX_FIXED_MS)
        self.digest = term(digest_ms_per_gib, self.MAX_DIGEST_MS_PER_GIB)  # the source's, per GiB
        # The target's digest per GiB of its RAM, and the rest of its load (restore), as it reports
        # them; until it has, its digest is taken to cost what the source's does per byte.
        self.target_digest = term(digest_ms_per_gib, self.MAX_DIGEST_MS_PER_GIB)
        # The downtime's send as ms per GiB (a cost, so that its upper quartile is the slow rate).
        self.send = term(0.0, math.inf)
        # One cutover round trip (COMMIT -> RUNNING, the target's resume included): a single
        # handshake's round trip on a busy host can be off by hundreds of milliseconds.
        self.round_trip = term(0.0, self.MAX_FIXED_MS)
        # How far measured downtimes went beyond their prediction (headroom excluded): the
        # headroom the next predictions add. It grows with the spread of what was measured
        # around what was predicted, and is 0 for a path that never went beyond.
        self.miss = term(FIRST_MISS_MS, self.MAX_FIXED_MS)
        # The sends' pace in ms per GiB (HostSpeed) in the migrations these costs came from.
        self.send_pace = term(0.0, math.inf)
        self.learned = 0
        self.outliers = 0

    @property
    def fixed_ms(self) -> float:
        return self.fixed.value()

    @property
    def headroom_ms(self) -> float:
        return self.miss.value()

    def slowdown(self, send_ms_per_gib_now: float) -> float:
        """How much slower the host is now than when the costs were learned: the sends' pace
        now against their pace then (its typical value), at least 1 (a faster host keeps the
        learned costs: they are what was measured), at most MAX_SLOWDOWN."""
        if not self.send_pace.learned or send_ms_per_gib_now <= 0:
            return 1.0
        then = max(self.send_pace.median(), PACE_FLOOR_MS_PER_GIB)
        return min(max(send_ms_per_gib_now / then, 1.0), MAX_SLOWDOWN)

    @property
    def pause_ms(self) -> float:
        return self.pause.value()

    @property
    def downtime_bandwidth_bytes_s(self) -> float:
        # An old rate is dropped rather than faded: no rate means "use the rounds' rate".
        if not self.send.learned or self.send.age_s() > 2 * self.HALF_LIFE_S:
            return 0.0
        return GIB / (max(self.send.value(), 1e-3) / 1e3)

    def round_trip_ms(self, handshake_rtt_ms: float) -> float:
        """One round trip of the cutover: learned, or this connection's handshake until then.
        One learned sample alone is no more than this connection's handshake: a single slow
        cutover would otherwise keep every later migration from converging, and a migration
        that does not converge teaches nothing."""
        if len(self.round_trip) == 1:
            return min(self.round_trip.value(), handshake_rtt_ms)
        return self.round_trip.value() if self.round_trip.learned else handshake_rtt_ms

    def digest_ms(
        self,
        data_bytes: int,
        target_bytes: int | None = None,
        ram_bytes: int = 0,
        measured: DigestSample | None = None,
    ) -> float:
        """Both sides' digests, one after the other (the target's starts on DONE). The target's
        RAM file may hold more than the source's (its prefault populates whole ranges, holes
        included): `target_bytes`, when given, is what its digest reads (at most the RAM size).
        `ram_bytes`: the guest's RAM, for the part of a digest that follows its size whatever the
        data (FIRST_DIGEST_MS_PER_GIB_RAM), counted until the path has been measured.
        `measured`: this migration's own digest of the source's RAM, timed before the downtime;
        until the path has been measured it replaces those defaults (`_measured_digest_ms`)."""
        target = data_bytes if target_bytes is None else max(data_bytes, target_bytes)
        target_rate = self.target_digest.value() if self.target_digest.learned else self.digest.value()
        unmeasured = 0.0 if self.learned else 2 * FIRST_DIGEST_MS_PER_GIB_RAM * ram_bytes
        priced = (self.digest.value() * data_bytes + target_rate * target + unmeasured) / GIB
        if not self.learned and measured is not None:
            # Only ever lower: timed while the guest runs, a digest shares the cores with its
            # vCPUs, which are parked in the downtime (a 2-vCPU guest writing 128 MiB/s at CPL3
            # here: 54 ms timed per side, against the 65 ms both sides are priced by default).
            return min(priced, self._measured_digest_ms(measured, data_bytes, target, target_rate))
        return priced

    @staticmethod
    def _measured_digest_ms(measured: DigestSample, data_bytes: int, target: int, target_rate: float) -> float:
        """Both digests from one measured on the source: the source's grows with its data since
        (never below what was measured: part of a digest follows the RAM size, not the data);
        the target's digest walks the same RAM with the same code, so it costs what the source's
        does, plus what its file holds beyond the source's at the per-GiB rate."""
        source_ms = measured.ms * max(1.0, data_bytes / max(measured.data_bytes, 1))
        return 2 * source_ms + target_rate * (target - data_bytes) / GIB

    def learn(
        self,
        downtime_ms: float,
        steps_ms: dict[str, float],
        sent_bytes: int,
        data_bytes: int,
        predicted_ms: float,
        target_bytes: int | None = None,
        target_digest_ms: float | None = None,
        measured_now_ms: float = 0.0,
        headroom_ms: float = 0.0,
        send_ms_per_gib: float = 0.0,
    ) -> bool:
        """Learns from a completed migration's measured downtime and its steps (`pause`, `send`,
        `digest`, as the source times them), and the target's digest as it reported it (None:
        an older target that does not); False (and nothing learned) for an outlier.

        `measured_now_ms`: what the prediction counted from this migration's own measurements
        (the harvest, the state estimate), which the learned fixed rest must not count a second
        time. The round trips are learned from `commit_to_running` (one of them).
        `headroom_ms`: what the prediction added as headroom (the miss is measured without it).
        `send_ms_per_gib`: this migration's sends' pace (HostSpeed; 0: none measured)."""
        if is_outlier(downtime_ms, predicted_ms):
            self.outliers += 1
            return False
        pause_ms, send_ms, digest_ms = (steps_ms.get(k, 0.0) for k in ("pause", "send", "digest"))
        target = data_bytes if target_bytes is None else max(data_bytes, target_bytes)
        if digest_ms > 0 and data_bytes >= self.LEARN_DIGEST_FROM_BYTES:
            self.digest.add(digest_ms / (data_bytes / GIB))
        if target_digest_ms is not None and target_digest_ms > 0 and target >= self.LEARN_DIGEST_FROM_BYTES:
            self.target_digest.add(target_digest_ms / (target / GIB))
        if send_ms > 0 and sent_bytes >= self.LEARN_SEND_FROM_BYTES:
            self.send.add(send_ms / (sent_bytes / GIB))
        self.pause.add(pause_ms)
        round_trip_ms = steps_ms.get("commit_to_running", 0.0)
        if round_trip_ms > 0:
            self.round_trip.add(round_trip_ms)
        if target_digest_ms is None:
            # The target's digest is taken to cost what the source's did per byte, over its bytes.
            target_digest_ms = digest_ms * target / data_bytes if data_bytes else digest_ms
        rest = downtime_ms - pause_ms - send_ms - digest_ms - target_digest_ms - measured_now_ms
        self.fixed.add(rest - 2 * round_trip_ms)
        self.miss.add(downtime_ms - (predicted_ms - headroom_ms))
        if send_ms_per_gib > 0:
            self.send_pace.add(send_ms_per_gib)
        self.learned += 1
        return True

    def _terms(self) -> dict[str, RobustCost]:
        return {
            "fixed": self.fixed,
            "pause": self.pause,
            "digest": self.digest,
            "target_digest": self.target_digest,
            "send": self.send,
            "round_trip": self.round_trip,
            "miss": self.miss,
            "send_pace": self.send_pace,
        }

    def to_record(self) -> dict[str, object]:
        return {
            "terms": {name: term.to_record() for name, term in self._terms().items()},
            "learned": self.learned,
            "outliers": self.outliers,
        }

    def load_record(self, record: object, more_age_s: float, what: str) -> None:
        """ValueError naming `what` and the problem if `record` is not what `to_record` writes.
        A term the record lacks (written by an older release) keeps its default."""
        if not isinstance(record, dict) or not isinstance(record.get("terms"), dict):
            raise ValueError(f"{what}: an object with 'terms' expected")
        terms = self._terms()
        unknown = set(record["terms"]) - set(terms)
        if unknown:
            raise ValueError(f"{what}: unknown terms {sorted(unknown)}")
        for name, samples in record["terms"].items():
            terms[name].load_record(samples, more_age_s, f"{what}.{name}")
        for count in ("learned", "outliers"):
            value = record.get(count, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{what}.{count}: a count (integer >= 0) expected, got {value!r}")
            setattr(self, count, value)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "fixed_ms": round(self.fixed_ms, 2),
            "pause_ms": round(self.pause_ms, 2),
            "downtime_send_mib_s": round(self.downtime_bandwidth_bytes_s / (1 << 20), 1),
            "digest_ms_per_gib": round(self.digest.value(), 2),
            "target_digest_ms_per_gib": round(self.target_digest.value(), 2),
            "round_trip_ms": round(self.round_trip.value(), 2),
            "headroom_ms": round(self.headroom_ms, 2),
            "send_pace_ms_per_gib": round(self.send_pace.median(), 1),
            "learned": self.learned,
            "outliers": self.outliers,
        }


class DowntimeModels:
    """One DowntimeModel per peer (the costs of one path say nothing about another), bounded:
    the least recently used peer's model is dropped past MAX_PEERS."""

    MAX_PEERS = 64

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._models: OrderedDict[str, DowntimeModel] = OrderedDict()

    def for_peer(self, peer: str) -> DowntimeModel:
        model = self._models.get(peer)
        if model is None:
            model = self._models[peer] = DowntimeModel(clock=self._clock)
            while len(self._models) > self.MAX_PEERS:
                self._models.popitem(last=False)
        self._models.move_to_end(peer)
        return model

    def __len__(self) -> int:
        return len(self._models)

    def peers(self) -> list[str]:
        return list(self._models)

    RECORD_VERSION = 1

    def to_record(self, wall_now: float) -> dict[str, object]:
        """Every peer's model, least recently used first, stamped with the wall clock (`time.time()`)."""
        return {
            "version": self.RECORD_VERSION,
            "written_at": wall_now,
            "peers": {peer: model.to_record() for peer, model in self._models.items()},
        }

    @classmethod
    def from_record(
        cls, record: object, wall_now: float, clock: Callable[[], float] = time.monotonic
    ) -> DowntimeModels:
        """The models of `to_record`, aged by the time since it was written; ValueError naming
        the problem for anything else (another version, a bad value, too many peers)."""
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if record.get("version") != cls.RECORD_VERSION:
            raise ValueError(f"version {record.get('version')!r}; this daemon reads version {cls.RECORD_VERSION}")
        written_at, peers = record.get("written_at"), record.get("peers")
        if not isinstance(written_at, (int, float)) or isinstance(written_at, bool) or not math.isfinite(written_at):
            raise ValueError("'written_at' is not a time")
        if not isinstance(peers, dict) or len(peers) > cls.MAX_PEERS:
            raise ValueError(f"'peers': an object of at most {cls.MAX_PEERS} peers expected")
        # A clock set back since (written_at in the future) ages nothing rather than rejuvenating.
        down_s = max(0.0, wall_now - written_at)
        models = cls(clock)
        for peer, model_record in peers.items():
            models.for_peer(peer).load_record(model_record, down_s, f"peers[{peer!r}]")
        return models
