"""The learned downtime costs survive a daemon restart (state dir, downtime_models_file.py); a
bad file is reported in one event and ignored."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import MakeDaemon
from daemons import wait_for
from migrated.migration.downtime_models_file import MAX_BYTES, load_models, models_path, save_models
from migrated.migration.policy import DowntimeModel, DowntimeModels
from test_migration import assert_runs_here, create, migrate

DEFAULT_FIXED_MS = DowntimeModel().fixed_ms + DowntimeModel().pause_ms


# ---- the file (no KVM) ------------------------------------------------------------------------


def test_saved_models_load_back(tmp_path: Path) -> None:
    models = DowntimeModels()
    model = models.for_peer("10.0.0.2:7890")
    steps = {"pause": 2.0, "send": 10.0, "digest": 5.0, "commit_to_running": 3.0}
    for _ in range(3):
        assert model.learn(60.0, steps, sent_bytes=8 << 20, data_bytes=128 << 20, predicted_ms=55.0)
    save_models(tmp_path, models.to_record(wall_now=time.time()))
    loaded, error = load_models(tmp_path)
    assert error is None
    assert loaded.peers() == ["10.0.0.2:7890"]
    assert loaded.for_peer("10.0.0.2:7890").as_dict() == pytest.approx(model.as_dict(), rel=1e-3)
    assert not list(tmp_path.glob("*.tmp")), "written whole: no temporary file left"


def test_no_file_is_no_problem(tmp_path: Path) -> None:
    models, error = load_models(tmp_path)
    assert error is None and len(models) == 0


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "Expecting property name"),
        (b'{"version": 7, "written_at": 0, "peers": {}}', "version 7; this daemon reads version 1"),
        (b"[" * 100_000 + b"]" * 100_000, "maximum recursion depth exceeded"),
        (b" " * (MAX_BYTES + 1), "more than 524288 bytes"),
    ],
)
def test_a_bad_file_is_named_and_ignored(tmp_path: Path, content: bytes, problem: str) -> None:
    models_path(tmp_path).write_bytes(content)
    models, error = load_models(tmp_path)
    assert len(models) == 0, "the defaults, as without a file"
    assert error is not None and str(models_path(tmp_path)) in error and problem in error, error


# ---- real daemons ---------------------------------------------------------------------------


@pytest.mark.kvm
def test_a_restarted_daemon_predicts_from_what_it_learned(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", downtime_limit_ms=300), make_daemon("b", downtime_limit_ms=300)
    create(a, rate=0.0, memory_mib=128, working_set_mib=16)
    first = migrate(a, b)
    assert first["state"] == "completed", first
    assert first["predicted_downtime_terms_ms"]["learned_fixed_ms"] == DEFAULT_FIXED_MS
    # Written once the migration completed, off its downtime: waited for, not assumed.
    path = models_path(a.workdir / "a-state")
    wait_for(path.exists, what="the learned costs to be saved")
    saved = json.loads(path.read_text())
    assert list(saved["peers"]) == [b.address], saved
    learned = DowntimeModels.from_record(saved, saved["written_at"]).for_peer(b.address)
    assert learned.learned == 1

    assert a.stop() == 0
    a.start()
    (loaded,) = a.events("downtime_models_loaded")
    assert loaded["peers"] == [b.address], loaded
    back = migrate(b, a)
    assert back["state"] == "completed", back
    forth = migrate(a, b)
    assert forth["state"] == "completed", forth
    # The restarted daemon's prediction is the one it learned before, not the defaults.
    predicted_fixed = forth["predicted_downtime_terms_ms"]["learned_fixed_ms"]
    assert predicted_fixed == pytest.approx(learned.fixed_ms + learned.pause_ms, abs=0.05), forth
    assert predicted_fixed != DEFAULT_FIXED_MS
    # `migration status` shows the prediction term by term, the headroom and the slower host too.
    terms = forth["predicted_downtime_terms_ms"]
    parts = [v for k, v in terms.items() if k != "total_ms"]
    assert {"headroom_ms", "slower_host_ms", "learned_fixed_ms", "verify_ms"} <= set(terms), terms
    assert abs(sum(parts) - terms["total_ms"]) < 0.1, terms
    # The headroom is the learned one, scaled like every learned term by how much slower this
    # host runs now (a loaded CI host: 4.6x once); the scale is read back from slower_host_ms.
    learned_terms = terms["state_ms"] + terms["verify_ms"] + terms["round_trips_ms"] + terms["learned_fixed_ms"]
    slowdown = 1.0 + terms["slower_host_ms"] / learned_terms
    assert terms["headroom_ms"] == pytest.approx(slowdown * learned.headroom_ms, rel=0.01, abs=0.05), terms
    assert_runs_here(b, "vm1")


@pytest.mark.kvm
def test_a_corrupt_models_file_is_reported_once_and_the_daemon_serves(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    state = tmp_path / "a-state"
    state.mkdir()
    models_path(state).write_text(
        '{"version": 1, "written_at": 0, "peers": {"x": {"terms": {"fixed": [[0, "slow"]]}}}}'
    )
    a, b = make_daemon("a", downtime_limit_ms=300), make_daemon("b", downtime_limit_ms=300)
    (ignored,) = a.events("downtime_models_ignored")
    assert ignored["level"] == "warning"
    assert str(models_path(state)) in str(ignored["error"]) and "peers['x'].fixed" in str(ignored["error"])
    create(a, rate=0.0, memory_mib=128, working_set_mib=16)
    done = migrate(a, b)
    assert done["state"] == "completed", done
    assert done["predicted_downtime_terms_ms"]["learned_fixed_ms"] == DEFAULT_FIXED_MS
    # The completed migration writes a good file over the bad one.
    wait_for(lambda: load_models(state)[1] is None, what="the bad file to be replaced")
    assert load_models(state)[0].peers() == [b.address]
