"""The per-vCPU dirty-limit controller (migrated/migration/dirtylimit.py): a pure function of the
rings' counts, the shares in force, the bandwidth and the downtime limit; no clock, no KVM."""

from __future__ import annotations

import pytest

from migrated.migration import dirtylimit
from migrated.migration.dirtylimit import MAX_SHARE, MIN_QUOTA_BYTES_S, fair_quotas, next_share, plan
from migrated.migration.policy import Decision, DowntimeEstimate, Policy

MIB = 1 << 20


def test_rates_come_from_each_rings_pages() -> None:
    # 25,600 pages of 4 KiB in 0.5 s: 200 MiB/s; a vCPU without pages dirtied nothing.
    assert dirtylimit.rates_bytes_s({0: 25_600}, 2, 0.5) == [200 * MIB, 0.0]
    with pytest.raises(ValueError, match="positive interval"):
        dirtylimit.rates_bytes_s({0: 1}, 1, 0.0)


def test_budget_is_half_the_link_or_what_the_downtime_has_room_for() -> None:
    # 64 MiB/s link, 400 ms limit, 100 ms of other costs, 0.5 s rounds: 300 ms of room carries
    # 19.2 MiB, filled in a 0.5 s round at 38.4 MiB/s; half the link (32 MiB/s) is less.
    assert dirtylimit.dirty_budget_bytes_s(64 * MIB, 400, 100, 0.5, 2) == pytest.approx(32 * MIB)
    # 2 s rounds: the room fills at 9.6 MiB/s, under half the link.
    assert dirtylimit.dirty_budget_bytes_s(64 * MIB, 400, 100, 2.0, 2) == pytest.approx(9.6 * MIB)
    # Other costs beyond the limit: only the floor is left.
    assert dirtylimit.dirty_budget_bytes_s(64 * MIB, 400, 500, 0.5, 2) == 2 * MIN_QUOTA_BYTES_S


def test_fair_quotas_meet_small_demands_and_split_the_rest() -> None:
    # 32 MiB/s between a vCPU wanting 4 and one wanting 400: the small one keeps its 4.
    assert fair_quotas([400 * MIB, 4 * MIB], 32 * MIB) == [28 * MIB, 4 * MIB]
    # Three heavy vCPUs and a light one: the light keeps 2, the others share 28 equally.
    quotas = fair_quotas([100 * MIB, 2 * MIB, 50 * MIB, 80 * MIB], 30 * MIB)
    assert quotas[1] == 2 * MIB and quotas[0] == pytest.approx(28 * MIB / 3)
    assert quotas[2] == pytest.approx(quotas[0]) and quotas[3] == pytest.approx(quotas[0])
    # Never under the floor, even when the budget is gone.
    assert fair_quotas([100 * MIB, 100 * MIB], 0.0) == [MIN_QUOTA_BYTES_S, MIN_QUOTA_BYTES_S]


def test_the_fast_vcpu_is_limited_and_the_slow_one_runs_free() -> None:
    result = plan([400 * MIB, 4 * MIB], [0.0, 0.0], 32 * MIB)
    fast, slow = result.vcpus
    assert fast.quota_bytes_s == 28 * MIB and fast.share == pytest.approx(1 - 28 / 400)
    assert slow.share == 0.0 and not slow.limited
    assert [v.vcpu for v in result.limited] == [0] and not result.exhausted


def test_the_share_follows_the_measurement_under_it() -> None:
    # Held at 50% the vCPU still dirtied 100 MiB/s: it wants 200 running free; quota 20 -> 90%.
    assert next_share(0.5, 200 * MIB, 20 * MIB) == pytest.approx(0.9)
    result = plan([100 * MIB, 0.0], [0.5, 0.0], 21 * MIB)
    assert result.vcpus[0].demand_bytes_s == pytest.approx(200 * MIB)
    assert result.vcpus[0].share == pytest.approx(0.9)
    # The guest calmed down: under its quota now, the vCPU runs free again.
    assert plan([1 * MIB, 0.0], [0.9, 0.0], 32 * MIB).vcpus[0].share == 0.0
    # A change under SHARE_STEP is measurement noise: the share in force stays.
    assert next_share(0.9, 200 * MIB, 20.1 * MIB) == 0.9


def test_the_share_is_bounded_and_exhaustion_is_reported() -> None:
    first = plan([4000 * MIB, 0.0], [0.0, 0.0], 2 * MIB)
    assert first.vcpus[0].share == MAX_SHARE and not first.exhausted  # just got there
    again = plan([40 * MIB, 0.0], [MAX_SHARE, 0.0], 2 * MIB)
    assert again.vcpus[0].share == MAX_SHARE and again.exhausted
    with pytest.raises(ValueError, match="2 rates for 1 shares"):
        plan([1.0, 2.0], [0.0], 1.0)


def test_the_policy_limits_dirtying_after_max_rounds_until_exhausted() -> None:
    big = DowntimeEstimate(pages=100_000, transfer_ms=900, harvest_ms=1, state_ms=1, verify_ms=0, round_trips_ms=1)
    small = DowntimeEstimate(pages=10, transfer_ms=1, harvest_ms=1, state_ms=1, verify_ms=0, round_trips_ms=1)
    policy = Policy(downtime_limit_ms=50, max_rounds=3, timeout_s=60, on_no_convergence="dirty-limit")
    assert policy.decide(big, rounds=2, elapsed_s=1) is Decision.ANOTHER_ROUND
    assert policy.decide(big, rounds=3, elapsed_s=1) is Decision.LIMIT_DIRTY
    assert policy.decide(big, rounds=30, elapsed_s=1) is Decision.LIMIT_DIRTY
    assert policy.decide(big, rounds=30, elapsed_s=1, dirty_limit_exhausted=True) is Decision.GIVE_UP
    assert policy.decide(big, rounds=3, elapsed_s=61) is Decision.GIVE_UP
    assert policy.decide(small, rounds=30, elapsed_s=1) is Decision.STOP_AND_COPY


def test_describe_names_the_vcpu_and_its_limit_in_mib_s() -> None:
    fast = plan([400 * MIB, 4 * MIB], [0.0, 0.0], 32 * MIB).vcpus[0]
    assert dirtylimit.describe(fast) == {
        "vcpu": 0,
        "limit_mib_s": 28.0,
        "dirty_rate_mib_s": 400.0,
        "throttle_percent": 93.0,
    }
