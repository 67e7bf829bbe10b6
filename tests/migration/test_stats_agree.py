"""Both sides of one real migration report the same numbers where they describe the same thing
(`migration status` on the source and on the target, through the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from daemons import REPO, DaemonProcess, MakeDaemon, heartbeat, wait_for, wait_migration
from test_migration import assert_runs_here, create

# The same thing on both sides, counted on each side independently except the two times only
# the source can take (it paused and it started the migration), which it sends to the target.
SAME_COUNTS = ("migration_id", "rounds", "pages_sent", "zero_pages", "untouched_pages", "bytes_sent", "final_pages")
SAME_TIMES_MS = ("downtime_ms", "guest_downtime_ms", "total_ms")


def status(daemon: DaemonProcess, name: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "migrated.cli", "--socket", str(daemon.socket), "migration", "status", name, "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_source_and_target_status_agree(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", downtime_limit_ms=300), make_daemon("b")
    # 512 MiB with a 128 MiB working set: holes the source never touched, and a guest that dirties
    # enough during the bulk copy for at least one dirty round.
    create(a, memory_mib=512, rate=64.0, working_set_mib=128)
    wait_for(lambda: heartbeat(a, "vm1") > 0, what="the guest to run")
    a.call("migrate", name="vm1", to=b.address)
    source = wait_migration(a, "vm1")
    assert source["state"] == "completed", source
    assert wait_migration(b, "vm1")["state"] == "completed"  # the target's part ends after the source's
    assert_runs_here(b, "vm1")
    source = status(a, "vm1")
    target = status(b, "vm1")
    assert (source["role"], target["role"]) == ("source", "target")
    # Preconditions, so that each comparison below can fail.
    # (Even 0 dirty rounds tells: the target saw the downtime's pass as round 1.)
    assert isinstance(source["rounds"], int) and isinstance(source["final_pages"], int), source
    assert source["final_pages"] > 0, "the guest dirtied pages until the pause"
    assert isinstance(source["untouched_pages"], int) and source["untouched_pages"] > 0, source
    assert isinstance(source["pages_sent"], int) and source["pages_sent"] > 0, source
    for key in SAME_COUNTS:
        assert source[key] == target[key], (key, source[key], target[key])
    for key in SAME_TIMES_MS:
        assert isinstance(source[key], float) and isinstance(target[key], float), (key, source, target)
        assert abs(source[key] - target[key]) < 0.01, (key, source[key], target[key])
    # The resolved tracking mode on both sides, never what was asked for ("auto").
    assert source["dirty_tracking"] == target["dirty_tracking"] == "ring"
