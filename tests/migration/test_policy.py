"""Convergence maths (pure): what the prediction counts, when it stops, what it learns."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from migrated.migration.policy import (
    MAX_SLOWDOWN,
    Costs,
    Decision,
    DigestSample,
    DowntimeModel,
    DowntimeModels,
    Policy,
    RateMeter,
    RobustCost,
    first_round_trip_ms,
    is_outlier,
    predict_downtime,
)

COSTS = Costs(harvest_ms=1.0, fixed_ms=10.0, state_bytes=20_000, digest_ms=30.0, rtt_ms=0.5)


def test_prediction_counts_more_than_the_pages() -> None:
    estimate = predict_downtime(1000, dirty_pages_per_s=0.0, bandwidth_bytes_s=1 << 30, costs=COSTS)
    pages_only = 1000 * 4096 / (1 << 30) * 1e3
    assert estimate.total_ms > pages_only + 40  # fixed, digest, harvest and round trips
    assert estimate.round_trips_ms == 1.0


def test_pages_dirtied_before_the_pause_are_counted() -> None:
    quiet = predict_downtime(0, 0.0, 1 << 30, COSTS)
    busy = predict_downtime(0, 100_000.0, 1 << 30, COSTS)  # 100k pages/s over a 1 ms harvest
    assert busy.pages == 100 and busy.total_ms > quiet.total_ms


def test_policy_decisions() -> None:
    policy = Policy(downtime_limit_ms=50, max_rounds=5, timeout_s=60, on_no_convergence="abort")
    fits = predict_downtime(10, 0.0, 1 << 30, COSTS)
    big = predict_downtime(10**6, 0.0, 1 << 30, COSTS)
    assert policy.decide(fits, rounds=0, elapsed_s=0) is Decision.STOP_AND_COPY
    assert policy.decide(big, rounds=1, elapsed_s=1) is Decision.ANOTHER_ROUND
    assert policy.decide(big, rounds=5, elapsed_s=1) is Decision.GIVE_UP
    assert policy.decide(big, rounds=1, elapsed_s=61) is Decision.GIVE_UP
    forced = Policy(50, 5, 60, "force-downtime")
    assert forced.decide(big, rounds=5, elapsed_s=1) is Decision.STOP_AND_COPY


def test_model_learns_only_from_digests_of_real_data() -> None:
    model = DowntimeModel(fixed_ms=10.0, digest_ms_per_gib=70.0, clock=FakeClock())
    model.learn(
        25.0, {"send": 1.0, "digest": 5.0}, sent_bytes=0, data_bytes=64 << 10, predicted_ms=30.0
    )  # a tiny guest
    assert model.digest_ms(1 << 30) == 140.0  # unchanged: 5 ms for 64 KiB says nothing per GiB
    model.learn(100.0, {"send": 10.0, "digest": 20.0}, sent_bytes=0, data_bytes=512 << 20, predicted_ms=90.0)
    assert model.digest_ms(1 << 30) == 2 * 40.0  # the first measurement replaces the guess
    assert model.fixed_ms > 0


def test_rate_meter_weights_recent_samples() -> None:
    meter = RateMeter(weight=0.5)
    assert meter.add(100, 1.0) == 100
    assert meter.add(300, 1.0) == 200
    assert meter.add(5, 0.0) == 200  # no time, no sample


def test_throttle_steps_up_then_gives_up() -> None:
    from migrated.migration.policy import THROTTLE_STEPS

    policy = Policy(downtime_limit_ms=50, max_rounds=3, timeout_s=60, on_no_convergence="throttle")
    big = predict_downtime(10**6, 0.0, 1 << 30, COSTS)
    assert policy.decide(big, rounds=2, elapsed_s=1) is Decision.ANOTHER_ROUND
    for step in range(-1, len(THROTTLE_STEPS) - 1):
        assert policy.decide(big, rounds=3 + step + 1, elapsed_s=1, throttle_step=step) is Decision.THROTTLE_MORE
    assert policy.decide(big, rounds=9, elapsed_s=1, throttle_step=len(THROTTLE_STEPS) - 1) is Decision.GIVE_UP
    assert policy.decide(big, rounds=3, elapsed_s=61, throttle_step=0) is Decision.GIVE_UP


class FakeClock:
    """A clock the test moves by hand: the model's decay is a function of time, not of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_prediction_is_shown_term_by_term_and_adds_up() -> None:
    estimate = predict_downtime(1000, 50_000.0, 1 << 30, COSTS)
    terms = estimate.terms_ms()
    parts = (
        "transfer_ms",
        "harvest_ms",
        "state_ms",
        "verify_ms",
        "round_trips_ms",
        "learned_fixed_ms",
        "slower_host_ms",
        "headroom_ms",
    )
    assert set(parts) | {"total_ms"} == set(terms)
    assert abs(sum(terms[k] for k in parts) - terms["total_ms"]) < 0.05
    assert terms["learned_fixed_ms"] == COSTS.fixed_ms + COSTS.pause_ms


def test_a_stalled_migration_is_an_outlier_and_is_not_learned() -> None:
    """The 8 s stall that once made every later migration impossible: reported, not learned."""
    model = DowntimeModel(fixed_ms=10.0, clock=FakeClock())
    assert is_outlier(8075.0, predicted_ms=40.0)
    assert not model.learn(8075.0, {"send": 5.0, "digest": 0.0}, sent_bytes=0, data_bytes=0, predicted_ms=40.0)
    assert model.fixed_ms == 10.0 and model.outliers == 1 and model.learned == 0
    # A small absolute miss on a fast path is no outlier: it is what the path costs.
    assert model.learn(70.0, {"send": 5.0, "digest": 0.0}, sent_bytes=0, data_bytes=0, predicted_ms=20.0)
    assert model.fixed_ms == 65.0


def test_the_learned_cost_is_bounded() -> None:
    model = DowntimeModel(fixed_ms=10.0, clock=FakeClock())
    for _ in range(20):  # a slow path, predicted about right every time: learned, but bounded
        model.learn(5000.0, {"send": 0.0, "digest": 0.0}, sent_bytes=0, data_bytes=0, predicted_ms=4000.0)
    assert model.fixed_ms == DowntimeModel.MAX_FIXED_MS


def test_the_learned_cost_fades_back_to_the_default() -> None:
    clock = FakeClock()
    model = DowntimeModel(fixed_ms=10.0, clock=clock)
    model.learn(210.0, {"send": 0.0, "digest": 0.0}, sent_bytes=0, data_bytes=0, predicted_ms=150.0)
    assert model.fixed_ms == 210.0
    clock.now += DowntimeModel.HALF_LIFE_S
    assert abs(model.fixed_ms - 110.0) < 1e-9  # half way back after one half-life
    clock.now += 20 * DowntimeModel.HALF_LIFE_S
    assert abs(model.fixed_ms - 10.0) < 0.001
    # A new sample moves what is left, not the stale value.
    model.learn(30.0, {"send": 0.0, "digest": 0.0}, sent_bytes=0, data_bytes=0, predicted_ms=20.0)
    assert 10.0 < model.fixed_ms <= 30.0


def test_models_are_per_peer_and_bounded() -> None:
    models = DowntimeModels()
    slow = models.for_peer("10.0.0.2:7890")
    slow.learn(400.0, {"send": 0.0, "digest": 0.0}, sent_bytes=0, data_bytes=0, predicted_ms=300.0)
    assert models.for_peer("10.0.0.2:7890") is slow
    assert models.for_peer("10.0.0.3:7890").fixed_ms == DowntimeModel().fixed_ms  # another path learns its own
    for n in range(DowntimeModels.MAX_PEERS + 10):
        models.for_peer(f"10.1.{n // 256}.{n % 256}:7890")
    assert len(models) == DowntimeModels.MAX_PEERS


def test_the_pause_and_the_downtime_send_rate_are_learned_and_used() -> None:
    model = DowntimeModel(clock=FakeClock())
    assert model.downtime_bandwidth_bytes_s == 0.0, "nothing learned: the rounds' rate is used"
    steps = {"pause": 18.0, "send": 150.0, "digest": 20.0}
    assert model.learn(313.0, steps, sent_bytes=30 << 20, data_bytes=256 << 20, predicted_ms=120.0)
    assert model.pause_ms == 18.0
    assert abs(model.downtime_bandwidth_bytes_s - (30 << 20) / 0.150) < 1.0
    assert model.fixed_ms == 313.0 - 18.0 - 150.0 - 2 * 20.0
    costs = Costs(
        harvest_ms=1.0,
        fixed_ms=model.fixed_ms,
        state_bytes=0,
        digest_ms=0.0,
        rtt_ms=0.0,
        pause_ms=model.pause_ms,
        downtime_bandwidth_bytes_s=model.downtime_bandwidth_bytes_s,
    )
    # The rounds saw 1 GiB/s, the downtime's send 200 MiB/s: the slower one is what counts.
    estimate = predict_downtime(7680, dirty_pages_per_s=0.0, bandwidth_bytes_s=1 << 30, costs=costs)
    assert abs(estimate.transfer_ms - 150.0) < 0.1
    # Pages dirtied while the vCPUs are being stopped count too.
    busy = predict_downtime(0, dirty_pages_per_s=10_000.0, bandwidth_bytes_s=1 << 30, costs=costs)
    assert busy.pages == int(10_000 * (1.0 + 18.0) / 1e3)


def test_the_targets_digest_is_counted_over_what_its_ram_file_holds() -> None:
    """The target's prefault populates whole ranges (holes too): its digest may read the whole
    RAM while the source's reads only its data."""
    model = DowntimeModel(digest_ms_per_gib=80.0, clock=FakeClock())
    assert model.digest_ms(256 << 20) == 2 * 20.0
    assert model.digest_ms(256 << 20, 1 << 30) == 20.0 + 80.0
    # What is left after both digests is what is learned as the fixed rest.
    steps = {"pause": 0.0, "send": 0.0, "digest": 20.0}
    assert model.learn(130.0, steps, sent_bytes=0, data_bytes=256 << 20, predicted_ms=120.0, target_bytes=1 << 30)
    assert model.fixed_ms == 130.0 - 20.0 - 80.0


# ---- the robust estimator: one term, then the model (fake clock, no timing) ----------------------


def test_one_slow_sample_does_not_make_the_next_migrations_cautious() -> None:
    clock = FakeClock()
    cost = RobustCost(default=30.0, half_life_s=1800.0, clock=clock, bound=1000.0)
    for _ in range(RobustCost.WINDOW):
        cost.add(40.0)
        clock.now += 60
    cost.add(400.0)  # one stall the outlier rule did not catch
    assert cost.value() == pytest.approx(40.0, abs=1.0)
    for _ in range(10):  # the next ten migrations see the usual cost, and learn it again
        clock.now += 60
        assert cost.value() == pytest.approx(40.0, abs=1.0)
        cost.add(41.0)
    assert cost.value() == pytest.approx(41.0, abs=1.0)


def test_a_host_that_became_slower_is_seen_at_the_second_sample() -> None:
    clock = FakeClock()
    cost = RobustCost(default=30.0, half_life_s=1800.0, clock=clock, bound=1000.0)
    for _ in range(RobustCost.WINDOW):
        cost.add(40.0)
    cost.add(120.0)
    assert cost.value() == 40.0, "one sample alone is noise"
    cost.add(125.0)
    assert cost.value() == 120.0, "two in a row are the host now"


def test_a_host_that_became_faster_is_seen_within_the_window() -> None:
    clock = FakeClock()
    cost = RobustCost(default=30.0, half_life_s=1800.0, clock=clock, bound=1000.0)
    for _ in range(RobustCost.WINDOW):
        cost.add(120.0)
    seen_after = next(n for n in range(1, RobustCost.WINDOW + 1) if (cost.add(40.0), cost.value())[1] == 40.0)
    assert seen_after < RobustCost.WINDOW


def test_old_samples_decay_in_weight_and_the_estimate_fades_to_the_default() -> None:
    clock = FakeClock()
    cost = RobustCost(default=30.0, half_life_s=100.0, clock=clock, bound=1000.0)
    for _ in range(6):
        cost.add(200.0)
    clock.now += 1000.0  # ten half-lives: those six weigh almost nothing now
    cost.add(50.0)
    cost.add(50.0)
    assert cost.value() == 50.0
    clock.now += 100.0
    assert abs(cost.value() - (30.0 + (50.0 - 30.0) * 0.5)) < 1e-9
    clock.now += 100.0 * 40
    assert abs(cost.value() - 30.0) < 1e-6


def test_costs_are_bounded_and_never_negative() -> None:
    cost = RobustCost(default=30.0, half_life_s=100.0, clock=FakeClock(), bound=1000.0)
    cost.add(-5.0)
    assert cost.value() == 0.0
    for _ in range(3):
        cost.add(1e9)
    assert cost.value() == 1000.0


def test_the_model_recovers_after_an_outlier_and_sees_a_slower_host() -> None:
    """Whole model: a stall far beyond its prediction is not learned at all; a slower host
    (a CPU hog started since the last migration) moves the fixed cost after two migrations."""
    clock = FakeClock()
    model = DowntimeModel(fixed_ms=30.0, clock=clock)
    steps = {"pause": 5.0, "send": 10.0, "digest": 0.0}
    for _ in range(5):
        assert model.learn(55.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=60.0)
    assert model.fixed_ms == 40.0
    assert not model.learn(5000.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=60.0)
    assert model.fixed_ms == 40.0 and model.outliers == 1
    # Slower: 150 ms downtime where 60 were predicted, twice.
    assert model.learn(150.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=60.0)
    assert model.fixed_ms == 40.0
    assert model.learn(150.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=60.0)
    assert model.fixed_ms == 135.0


def test_the_targets_reported_digest_is_learned_as_its_own_rate() -> None:
    model = DowntimeModel(digest_ms_per_gib=70.0, clock=FakeClock())
    steps = {"pause": 0.0, "send": 0.0, "digest": 20.0}  # the source: 20 ms for 256 MiB
    assert model.learn(
        100.0,
        steps,
        sent_bytes=0,
        data_bytes=256 << 20,
        predicted_ms=100.0,
        target_bytes=1 << 30,
        target_digest_ms=30.0,
    )
    assert model.digest_ms(256 << 20, 1 << 30) == 20.0 + 30.0
    assert model.fixed_ms == 100.0 - 20.0 - 30.0


def test_what_this_migration_measured_itself_is_not_learned_twice() -> None:
    model = DowntimeModel(clock=FakeClock())
    steps = {"pause": 5.0, "send": 10.0, "digest": 0.0}
    assert model.learn(60.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=60.0, measured_now_ms=12.0)
    assert model.fixed_ms == 60.0 - 5.0 - 10.0 - 12.0


def test_the_cutover_round_trip_is_learned_instead_of_the_handshakes() -> None:
    """A handshake on a busy host measured 480 ms once: the cutover's own round trip counts."""
    model = DowntimeModel(clock=FakeClock())
    assert model.round_trip_ms(handshake_rtt_ms=480.0) == 480.0, "nothing learned yet"
    steps = {"pause": 5.0, "send": 10.0, "digest": 0.0, "commit_to_running": 4.0}
    assert model.learn(60.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=60.0)
    assert model.round_trip_ms(handshake_rtt_ms=480.0) == 4.0
    assert model.fixed_ms == 60.0 - 5.0 - 10.0 - 2 * 4.0


def test_with_few_samples_one_slow_sample_does_not_decide() -> None:
    cost = RobustCost(default=0.0, half_life_s=1800.0, clock=FakeClock(), bound=1000.0)
    cost.add(166.0)
    assert cost.value() == 166.0, "one sample is all there is"
    cost.add(22.0)
    assert cost.value() == 22.0, "of two, the slow one does not decide"
    cost.add(24.0)
    assert cost.value() == 24.0


def test_one_slow_cutover_round_trip_does_not_stop_every_later_migration() -> None:
    """Beside a CPU hog one COMMIT -> RUNNING took 166 ms: twice that is over a 300 ms limit by
    itself, and a migration that does not converge teaches nothing. Until a second sample, the
    handshake's round trip of this connection bounds it."""
    model = DowntimeModel(clock=FakeClock())
    steps = {"pause": 10.0, "send": 90.0, "digest": 0.0, "commit_to_running": 166.0}
    assert model.learn(325.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=288.0)
    assert model.round_trip_ms(handshake_rtt_ms=7.0) == 7.0
    steps["commit_to_running"] = 20.0
    assert model.learn(150.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=140.0)
    assert model.round_trip_ms(handshake_rtt_ms=7.0) == 20.0


# ---- headroom and a slower host (issue 11: the limit is a promise) -------------------------------


def test_the_headroom_is_what_the_measured_downtimes_went_beyond_their_predictions() -> None:
    model = DowntimeModel(clock=FakeClock())
    assert model.headroom_ms == pytest.approx(10.0), "nothing measured yet: the first-migration margin"
    steps = {"pause": 1.0, "send": 2.0, "digest": 0.0}
    for _ in range(RobustCost.WINDOW):  # predicted 30 (10 of them headroom), measured 20: no miss
        assert model.learn(20.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=30.0, headroom_ms=10.0)
    assert model.headroom_ms == 0.0, "a path that never went beyond its prediction needs no headroom"
    # A path whose downtime jumps around: the headroom grows with how far it went beyond.
    for measured in (45.0, 22.0, 50.0, 21.0, 48.0, 23.0, 46.0, 20.0):
        model.learn(measured, steps, sent_bytes=0, data_bytes=0, predicted_ms=30.0, headroom_ms=0.0)
    assert 15.0 <= model.headroom_ms <= 20.0
    estimate = predict_downtime(0, 0.0, 1 << 30, replace(COSTS, headroom_ms=model.headroom_ms))
    assert estimate.headroom_ms == model.headroom_ms
    assert estimate.total_ms == pytest.approx(predict_downtime(0, 0.0, 1 << 30, COSTS).total_ms + model.headroom_ms)


def test_a_host_slower_than_when_the_costs_were_learned_scales_them_up() -> None:
    model = DowntimeModel(clock=FakeClock())
    assert model.slowdown(500.0) == 1.0, "nothing learned: nothing to compare with"
    steps = {"pause": 1.0, "send": 2.0, "digest": 0.0}
    for _ in range(3):  # learned on a quiet host: sends at 250 ms per GiB (4 GiB/s)
        model.learn(20.0, steps, sent_bytes=0, data_bytes=0, predicted_ms=20.0, send_ms_per_gib=250.0)
    assert model.slowdown(250.0) == 1.0
    assert model.slowdown(100.0) == 1.0, "a faster host keeps the costs it measured"
    assert model.slowdown(750.0) == pytest.approx(3.0)
    assert model.slowdown(1e9) == MAX_SLOWDOWN
    quiet = predict_downtime(100, 0.0, 1 << 30, COSTS)
    slow = predict_downtime(100, 0.0, 1 << 30, replace(COSTS, slowdown=3.0))
    learned = COSTS.state_ms + COSTS.digest_ms + 2 * COSTS.rtt_ms + COSTS.fixed_ms + COSTS.pause_ms
    assert slow.slower_host_ms == pytest.approx(2 * learned)
    # The pages and the harvest were measured now, at the host's speed now: not scaled again.
    assert slow.transfer_ms == quiet.transfer_ms and slow.harvest_ms == quiet.harvest_ms
    assert slow.total_ms == pytest.approx(quiet.total_ms + 2 * learned)


def test_a_policy_sees_the_slower_host_and_iterates_instead_of_overshooting() -> None:
    policy = Policy(downtime_limit_ms=50, max_rounds=30, timeout_s=60, on_no_convergence="abort")
    costs = Costs(harvest_ms=0.5, fixed_ms=15.0, state_bytes=0, digest_ms=10.0, rtt_ms=2.0, pause_ms=2.0)
    assert policy.decide(predict_downtime(100, 0.0, 1 << 30, costs), rounds=1, elapsed_s=1) is Decision.STOP_AND_COPY
    slow = predict_downtime(100, 0.0, 1 << 30, replace(costs, slowdown=2.0))
    assert policy.decide(slow, rounds=1, elapsed_s=1) is Decision.ANOTHER_ROUND
    assert policy.decide(slow, rounds=30, elapsed_s=1) is Decision.GIVE_UP


# ---- persisted across a restart ---------------------------------------------------------------


def test_the_models_survive_a_round_trip_through_their_record_and_keep_ageing() -> None:
    clock = FakeClock()
    models = DowntimeModels(clock)
    fast, slow = models.for_peer("10.0.0.2:7890"), models.for_peer("10.0.0.3:7890")
    steps = {"pause": 3.0, "send": 40.0, "digest": 20.0, "commit_to_running": 4.0}
    for _ in range(3):
        fast.learn(90.0, steps, sent_bytes=8 << 20, data_bytes=256 << 20, predicted_ms=95.0, send_ms_per_gib=300.0)
        slow.learn(400.0, steps, sent_bytes=8 << 20, data_bytes=256 << 20, predicted_ms=350.0, headroom_ms=10.0)
    record = json.loads(json.dumps(models.to_record(wall_now=5000.0)))
    later = FakeClock()
    later.now = 77.0  # another process: its monotonic clock has nothing to do with the first's
    restored = DowntimeModels.from_record(record, wall_now=5000.0, clock=later)
    assert restored.peers() == models.peers(), "peers and their least-recently-used order kept"
    for peer in models.peers():
        assert restored.for_peer(peer).as_dict() == models.for_peer(peer).as_dict()
    # The time the daemon was down counts as age: the learned costs fade as they would have.
    aged = DowntimeModels.from_record(record, wall_now=5000.0 + DowntimeModel.HALF_LIFE_S, clock=later)
    default = DowntimeModel().fixed_ms
    now_fixed, aged_fixed = slow.fixed_ms, aged.for_peer("10.0.0.3:7890").fixed_ms
    assert aged_fixed == pytest.approx(default + (now_fixed - default) / 2)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ([], "not a JSON object"),
        ({"version": 99, "written_at": 0, "peers": {}}, "version 99"),
        ({"version": 1, "written_at": "noon", "peers": {}}, "'written_at' is not a time"),
        ({"version": 1, "written_at": 0, "peers": {f"p{n}": {} for n in range(65)}}, "at most 64 peers"),
        ({"version": 1, "written_at": 0, "peers": {"p": {"terms": {"fixed": [[0, "x"]]}}}}, "peers['p'].fixed"),
        ({"version": 1, "written_at": 0, "peers": {"p": {"terms": {"fixed": [[-1, 5]]}}}}, "age_s >= 0"),
        ({"version": 1, "written_at": 0, "peers": {"p": {"terms": {"fixed": [[0, 1]] * 9}}}}, "at most 8 samples"),
        ({"version": 1, "written_at": 0, "peers": {"p": {"terms": {"speed": []}}}}, "unknown terms ['speed']"),
        ({"version": 1, "written_at": 0, "peers": {"p": {"terms": {}, "learned": -1}}}, "peers['p'].learned"),
    ],
)
def test_a_bad_record_is_refused_with_the_problem_named(record: object, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        DowntimeModels.from_record(record, wall_now=0.0, clock=FakeClock())


def test_a_learned_value_from_a_record_is_bounded_like_a_measured_one() -> None:
    record = {"version": 1, "written_at": 0, "peers": {"p": {"terms": {"fixed": [[0, 1e12], [0, 1e12]]}}}}
    model = DowntimeModels.from_record(record, wall_now=0.0, clock=FakeClock()).for_peer("p")
    assert model.fixed_ms == DowntimeModel.MAX_FIXED_MS


def test_until_a_path_is_measured_a_digest_counts_the_guests_size_not_only_its_data() -> None:
    model = DowntimeModel(digest_ms_per_gib=70.0, clock=FakeClock())
    data_only = model.digest_ms(16 << 20, 16 << 20)
    assert model.digest_ms(16 << 20, 16 << 20, ram_bytes=512 << 20) == pytest.approx(data_only + 30.0)
    steps = {"pause": 1.0, "send": 2.0, "digest": 15.0}
    assert model.learn(60.0, steps, sent_bytes=0, data_bytes=16 << 20, predicted_ms=60.0, target_digest_ms=15.0)
    assert model.digest_ms(16 << 20, 16 << 20, ram_bytes=512 << 20) == data_only, "measured: what it learned"


def test_a_digest_timed_in_this_migration_prices_both_sides_until_the_path_is_measured() -> None:
    model = DowntimeModel(digest_ms_per_gib=70.0, clock=FakeClock())
    ram = 1 << 30
    sample = DigestSample(ms=4.0, data_bytes=2 << 20)
    defaults = model.digest_ms(2 << 20, 2 << 20, ram_bytes=ram)
    assert defaults > 60.0, "the defaults price a mostly empty guest's digests by its size"
    # Timed beside a running guest, a digest can read higher than the defaults: never raised.
    slow = DigestSample(ms=50.0, data_bytes=2 << 20)
    assert model.digest_ms(2 << 20, 2 << 20, ram_bytes=ram, measured=slow) == defaults
    # The target walks the same RAM with the same code: the source's measured cost, twice.
    assert model.digest_ms(2 << 20, 2 << 20, ram_bytes=ram, measured=sample) == pytest.approx(8.0)
    # More data since the measurement: the source's share grows with it, never shrinks below it.
    assert model.digest_ms(4 << 20, 4 << 20, ram_bytes=ram, measured=sample) == pytest.approx(16.0)
    assert model.digest_ms(1 << 20, 1 << 20, ram_bytes=ram, measured=sample) == pytest.approx(8.0)
    # What the target's file holds beyond the source's data, at the per-GiB rate.
    beyond = model.digest_ms(2 << 20, 66 << 20, ram_bytes=ram, measured=sample)
    assert beyond == pytest.approx(8.0 + 70.0 * (64 / 1024))
    # Once the path has been measured, the learned costs decide, not this migration's sample.
    steps = {"pause": 1.0, "send": 2.0, "digest": 4.0}
    assert model.learn(20.0, steps, sent_bytes=0, data_bytes=2 << 20, predicted_ms=20.0, target_digest_ms=4.0)
    learned = model.digest_ms(2 << 20, 2 << 20, ram_bytes=ram)
    assert model.digest_ms(2 << 20, 2 << 20, ram_bytes=ram, measured=sample) == learned


def test_a_measured_digest_lets_a_first_migration_under_a_tight_limit_converge() -> None:
    """The boot-sector guest's first migration at 30 ms with verify full (bench/fixed_cost.py:
    ~20 pages left, ~2 MiB of data in 150 MiB, a digest of 3-4 ms on each side): priced by the
    defaults it could never stop; priced by its measured digest it can."""
    model = DowntimeModel(clock=FakeClock())
    ram, data = 150 << 20, 2 << 20
    policy = Policy(30.0, max_rounds=30, timeout_s=60.0, on_no_convergence="abort")

    def estimate(measured: DigestSample | None) -> Decision:
        costs = Costs(
            harvest_ms=0.1,
            fixed_ms=model.fixed_ms,
            state_bytes=16384,
            digest_ms=model.digest_ms(data, 2 * data, ram, measured),
            rtt_ms=first_round_trip_ms(handshake_ms=5.0, link_ms=0.03),
            state_ms=1.0,
            pause_ms=model.pause_ms,
            headroom_ms=model.headroom_ms,
        )
        return policy.decide(predict_downtime(20, 5_000.0, 1 << 30, costs), rounds=1, elapsed_s=0.1)

    assert estimate(None) is Decision.ANOTHER_ROUND
    assert estimate(DigestSample(ms=3.0, data_bytes=data)) is Decision.STOP_AND_COPY
