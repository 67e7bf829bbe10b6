"""A full state dir (a small tmpfs, filled for real) costs no VM and no daemon: when the record
that COMMIT may go out cannot be written, the VM is not even paused and COMMIT never leaves; the
VM records that cannot be written are reported as events, and once space is back the same VM
migrates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import MakeDaemon
from daemons import wait_for
from helpers import fill_disk, tmpfs
from test_migration import assert_runs_here, create, migrate

pytestmark = pytest.mark.kvm


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Iterator[Path]:
    """a's state dir (make_daemon uses TMP/a-state) as a 1 MiB tmpfs."""
    with tmpfs(tmp_path / "a-state", "1m") as path:
        yield path


def test_a_full_state_dir_aborts_before_commit_and_the_vm_runs_on(
    make_daemon: MakeDaemon, small_state_dir: Path
) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    create(a, rate=8.0, memory_mib=64, working_set_mib=16)
    filler = fill_disk(small_state_dir / "filler")
    stats = migrate(a, b)
    assert stats["state"] == "failed", stats
    error = stats["error"]
    assert "cannot write the record" in error and "No space left" in error and "keeps running here" in error, error
    assert_runs_here(a, "vm1")
    # The record is written before the pause (no fsync in the downtime): the VM never paused.
    assert stats.get("downtime_ms") is None, stats
    assert '"event": "downtime_timeline"' not in a.log()
    wait_for(lambda: "vm1" not in [v["name"] for v in b.call("vm.list")], what="b to discard its copy")
    assert '"event": "vm_record_failed"' in a.log()
    assert a.alive() and a.call("daemon.status")["vms"] == 1
    filler.unlink()
    again = migrate(a, b)
    assert again["state"] == "completed", again
    assert_runs_here(b, "vm1")
