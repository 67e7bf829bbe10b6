"""The downtime limit is a promise (DESIGN 4): a guard bounds the pause when the target stalls,
an outlier is reported and never learned, and a completed migration over the limit says so.

The stall is real: the target process stops itself with SIGSTOP when DONE arrives (test fault
target-stop-on-done, first migration only) and runs again only when the test sends SIGCONT.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import MakeDaemon
from daemons import DaemonProcess, wait_for, wait_migration
from migrated.migration.policy import DowntimeModel
from test_migration import assert_runs_here, create, migrate

pytestmark = pytest.mark.kvm

# What a path predicts before it learned anything: the default fixed cost and pause.
DEFAULT_FIXED_MS = DowntimeModel().fixed_ms + DowntimeModel().pause_ms


def stopped(daemon: DaemonProcess) -> bool:
    """The process is in state T (stopped by a signal), per /proc/PID/stat."""
    assert daemon.process is not None
    stat = Path(f"/proc/{daemon.process.pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


@pytest.mark.parametrize("verify", ["full", "off"])
def test_a_target_stopped_in_the_downtime_is_cut_off_by_the_guard(make_daemon: MakeDaemon, verify: str) -> None:
    """The error names the step the downtime stalled in: the target's load, after the digest
    (verify full) or with none taken (verify off, where no `digest` step exists)."""
    a = make_daemon("a", downtime_limit_ms=300, downtime_guard_ms=700, verify=verify)
    b = make_daemon("b", faults="target-stop-on-done")
    create(a, rate=0.0, memory_mib=128, working_set_mib=16)
    try:
        stats = migrate(a, b)
        # The proof that the guard acted, without timing anything: the target is still frozen
        # (it cannot have answered) while the source already gave up and runs the VM again.
        assert stopped(b), "the target should still be stopped"
        assert stats["state"] == "failed", stats
        assert "downtime guard" in stats["error"] and "1000 ms" in stats["error"], stats["error"]
        assert "stalled in step 'target_load'" in stats["error"], stats["error"]
        assert stats["downtime_guard_ms"] == 1000
        assert stats["downtime_ms"] is not None, "the pause the guest saw is reported"
        assert_runs_here(a, "vm1")
        assert '"event": "downtime_guard_expired"' in a.log()
    finally:
        assert b.process is not None
        os.kill(b.process.pid, signal.SIGCONT)
    # The target, running again, never runs its copy: no COMMIT came.
    assert b.call("vm.list") is not None  # it serves again
    assert all(v["state"] != "running" for v in b.call("vm.list") if v["name"] == "vm1"), b.call("vm.list")
    assert_runs_here(a, "vm1")
    # Nothing was learned from the failure: an idle VM migrates next, predicted with the default.
    create(a, name="vm2", rate=0.0, memory_mib=64, working_set_mib=8)
    again = migrate(a, b, name="vm2")
    assert again["state"] == "completed", again
    assert again["predicted_downtime_terms_ms"]["learned_fixed_ms"] == DEFAULT_FIXED_MS, again[
        "predicted_downtime_terms_ms"
    ]
    assert_runs_here(b, "vm2")


def test_a_stalled_downtime_is_reported_and_not_learned(make_daemon: MakeDaemon) -> None:
    """A stall shorter than the guard completes, over the limit: it says so (stats, a warning
    event) and is an outlier, so the next prediction to that peer is not poisoned by it."""
    a = make_daemon("a", downtime_limit_ms=300, downtime_guard_ms=60_000)
    b = make_daemon("b", faults="target-stop-on-done")
    create(a, rate=0.0, memory_mib=128, working_set_mib=16)
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: stopped(b), timeout=60, what="the target to stop itself on DONE")
    # The stall itself, made long enough that no prediction of this idle VM comes near it.
    time.sleep(2.0)
    assert b.process is not None
    os.kill(b.process.pid, signal.SIGCONT)
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    assert stats["downtime_ms"] > 2000, stats["downtime_ms"]
    assert stats["downtime_limit_exceeded"] is True
    assert stats["downtime_outlier"] is True
    assert '"event": "downtime_limit_exceeded"' in a.log()
    assert '"event": "downtime_outlier_not_learned"' in a.log()
    # Back again and forth: the model of the path a -> b still holds its default.
    back = migrate(b, a)
    assert back["state"] == "completed", back
    forth = migrate(a, b)
    assert forth["state"] == "completed", forth
    assert forth["predicted_downtime_terms_ms"]["learned_fixed_ms"] == DEFAULT_FIXED_MS, forth[
        "predicted_downtime_terms_ms"
    ]
    assert_runs_here(b, "vm1")
