"""A per-vCPU dirty-rate limit: pure arithmetic on the rings' per-vCPU counts, no I/O, no clock.

For `on_no_convergence = "dirty-limit"` (QEMU 8.1 calls it dirty-limit). Where the whole-VM
throttle slows every vCPU alike, this slows only the vCPUs that dirty more than their quota, so a
vCPU that dirties little keeps running at full speed while the one that rewrites memory fastest
is held back.

Each round the caller passes the distinct pages each vCPU's dirty ring reported since the last
round and the shares in force. From them:
1. each vCPU's demand: the rate it would dirty at running free, its measured rate over the share
   of the time it ran (a vCPU held out of KVM_RUN for `share` of the time dirties only then);
2. the budget: the total dirty rate the link can absorb while the rounds still shrink toward the
   downtime limit (`dirty_budget_bytes_s`);
3. the quotas: the budget shared max-min fairly (water-filling): a vCPU whose demand fits under
   an equal split keeps it and runs free, the rest share what is left equally;
4. each limited vCPU's share of the throttle period, from its demand and quota; the next round's
   measurement corrects it (feedback), bounded by MAX_SHARE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PAGE_SIZE = 4096
MIB = 1 << 20

# The held share of a period never reaches 1: a vCPU held for good would stop answering the
# guest's own timers; 99% keeps it alive (QEMU's dirty-limit bounds its sleep the same way).
MAX_SHARE = 0.99
# The dirty rate at most this share of the link: each round then resends at most half of what
# the previous one sent, and the rounds shrink geometrically toward the downtime limit.
BANDWIDTH_SHARE = 0.5
# No vCPU is held below this (QEMU's default vcpu-dirty-limit is 1 MB/s): its guest still runs.
MIN_QUOTA_BYTES_S = 1.0 * MIB
# A share change smaller than this is noise in the measurement: the share in force is kept.
SHARE_STEP = 0.01


@dataclass(frozen=True)
class VcpuLimit:
    """One vCPU's state after a round: what it dirtied, what it may, and how it is held."""

    vcpu: int
    rate_bytes_s: float  # measured over the last round, with the share then in force
    demand_bytes_s: float  # what it would dirty running free (estimated)
    quota_bytes_s: float  # what it may dirty: its demand if that fits, else its fair share
    share: float  # the share of each throttle period it is held out of KVM_RUN (0: runs free)

    @property
    def limited(self) -> bool:
        return self.share > 0


@dataclass(frozen=True)
class DirtyLimitPlan:
    budget_bytes_s: float
    vcpus: tuple[VcpuLimit, ...]
    # Every vCPU over its quota was held at MAX_SHARE already and still is: limiting cannot
    # slow the guest further, and the policy gives up (or the timeout ends it).
    exhausted: bool

    @property
    def shares(self) -> list[float]:
        return [v.share for v in self.vcpus]

    @property
    def limited(self) -> list[VcpuLimit]:
        return [v for v in self.vcpus if v.limited]


def rates_bytes_s(pages_by_vcpu: Mapping[int, int], vcpus: int, seconds: float) -> list[float]:
    """Each vCPU's dirty rate from the distinct pages its ring reported over `seconds` (a vCPU
    with none: 0): the pages the link must carry again because of that vCPU."""
    if seconds <= 0:
        raise ValueError(f"a round of {seconds} s: the rates need a positive interval")
    return [pages_by_vcpu.get(i, 0) * PAGE_SIZE / seconds for i in range(vcpus)]


def dirty_budget_bytes_s(
    bandwidth_bytes_s: float, downtime_limit_ms: float, other_costs_ms: float, round_s: float, vcpus: int
) -> float:
    """The total dirty rate that lets the predicted downtime converge.

    At most BANDWIDTH_SHARE of the link; and at most what fills, within one round of `round_s`,
    the pages the downtime has room for once its other costs (`other_costs_ms`: harvest, state,
    digest, round trips, learned fixed costs) are paid: a guest dirtying at this rate leaves,
    after a round, a final set the limit can carry. Never under MIN_QUOTA_BYTES_S per vCPU."""
    budget = BANDWIDTH_SHARE * max(bandwidth_bytes_s, 0.0)
    room_ms = downtime_limit_ms - other_costs_ms
    if round_s > 0 and room_ms > 0:
        budget = min(budget, room_ms / 1e3 * bandwidth_bytes_s / round_s)
    elif room_ms <= 0:
        budget = 0.0  # the other costs alone break the limit: hold as far as the floor allows
    return max(budget, MIN_QUOTA_BYTES_S * vcpus)


def fair_quotas(demands: Sequence[float], budget: float) -> list[float]:
    """Max-min fair quotas (water-filling): the smallest demands are met in full while they fit
    under an equal split of what is left; every other vCPU gets that split."""
    quotas = [0.0] * len(demands)
    left = budget
    order = sorted(range(len(demands)), key=lambda i: demands[i])
    for position, index in enumerate(order):
        split = left / (len(demands) - position)
        quotas[index] = max(min(demands[index], split), MIN_QUOTA_BYTES_S)
        left = max(left - quotas[index], 0.0)
    return quotas


def next_share(share: float, demand_bytes_s: float, quota_bytes_s: float) -> float:
    """The share that holds a vCPU of this demand to its quota: it dirties only while it runs,
    so running (1 - share) of the time it dirties demand * (1 - share). 0 when the demand fits."""
    if demand_bytes_s <= quota_bytes_s:
        return 0.0
    wanted = min(1.0 - quota_bytes_s / demand_bytes_s, MAX_SHARE)
    if share > 0 and abs(wanted - share) < SHARE_STEP:
        return share
    return wanted


def plan(rates: Sequence[float], shares: Sequence[float], budget_bytes_s: float) -> DirtyLimitPlan:
    """The next round's shares from the rates measured under `shares` (the ones in force)."""
    if len(rates) != len(shares):
        raise ValueError(f"{len(rates)} rates for {len(shares)} shares")
    demands = [rate / (1.0 - share) for rate, share in zip(rates, shares, strict=True)]
    quotas = fair_quotas(demands, budget_bytes_s)
    vcpus = tuple(
        VcpuLimit(i, rates[i], demands[i], quotas[i], next_share(shares[i], demands[i], quotas[i]))
        for i in range(len(rates))
    )
    over = [v for v in vcpus if v.demand_bytes_s > v.quota_bytes_s]
    exhausted = bool(over) and all(v.share >= MAX_SHARE and shares[v.vcpu] >= MAX_SHARE for v in over)
    return DirtyLimitPlan(budget_bytes_s, vcpus, exhausted)


def describe(limit: VcpuLimit) -> dict[str, float | int]:
    """What `migration status` shows of a limited vCPU."""
    return {
        "vcpu": limit.vcpu,
        "limit_mib_s": round(limit.quota_bytes_s / MIB, 1),
        "dirty_rate_mib_s": round(limit.rate_bytes_s / MIB, 1),
        "throttle_percent": round(limit.share * 100, 1),
    }
