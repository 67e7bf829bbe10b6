"""Steering a migration from another terminal (QEMU's migrate-set-parameters) and KubeVirt-style
limits given to `migrate`, through the real migratectl against real daemons."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from conftest import MakeDaemon
from daemons import wait_for, wait_migration
from test_daemon_service import migratectl
from test_migration import assert_runs_here, create

pytestmark = pytest.mark.kvm


def test_a_raised_downtime_limit_lets_a_migration_converge(make_daemon: MakeDaemon) -> None:
    """At 1 ms no prediction ever fits; raised mid-migration to 5 s, the next round converges."""
    a, b = make_daemon("a"), make_daemon("b")
    create(a, memory_mib=128, working_set_mib=32, rate=16)
    started = migratectl(
        a, "migrate", "vm1", "--to", b.address, "--downtime-limit", "1", "--max-rounds", "10000", "--timeout", "600"
    )
    assert started.returncode == 0, started.stderr
    wait_for(lambda: a.call("migration.status", name="vm1")["round"] >= 2, what="two dirty rounds")
    changed = migratectl(a, "migration", "set", "vm1", "--downtime-limit", "5000", "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["downtime_limit_ms"] == 5000
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    assert stats["downtime_limit_ms"] == 5000
    assert '"event": "migration_parameters_changed"' in a.log()
    assert_runs_here(b, "vm1")


def test_a_lifted_bandwidth_cap_takes_effect_during_the_bulk_copy(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    create(a, memory_mib=256, working_set_mib=128, rate=64)
    wait_for(lambda: a.call("vm.show", name="vm1")["guest"]["pages_written"] > 128 * 256, what="the data")
    assert migratectl(a, "migrate", "vm1", "--to", b.address, "--max-bandwidth", "4").returncode == 0
    wait_migration(a, "vm1", until=("bulk",))
    assert migratectl(a, "migration", "set", "vm1", "--max-bandwidth", "0").returncode == 0
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    # At 4 MiB/s the 128 MiB bulk copy would average 4; lifted, it averages far more.
    assert stats["bandwidth_mib_s"] > 8, stats["bandwidth_mib_s"]


def test_parameters_of_a_finished_migration_cannot_change(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    create(a, memory_mib=64, working_set_mib=8)
    assert migratectl(a, "migrate", "vm1", "--to", b.address, "--wait").returncode == 0
    refused = migratectl(a, "migration", "set", "vm1", "--downtime-limit", "500")
    assert refused.returncode != 0 and "can no longer change" in refused.stderr, refused.stderr


def test_on_no_convergence_and_max_rounds_from_the_command_line(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    create(a, memory_mib=128, working_set_mib=32, rate=16)
    moved = migratectl(
        a,
        "migrate",
        "vm1",
        "--to",
        b.address,
        "--downtime-limit",
        "1",
        "--max-rounds",
        "2",
        "--on-no-convergence",
        "abort",
        "--wait",
    )
    assert moved.returncode != 0
    stats = a.call("migration.status", name="vm1")
    assert stats["state"] == "failed" and "did not converge after 2 rounds" in stats["error"], stats
    assert_runs_here(a, "vm1")


def test_the_completion_timeout_per_gib_bounds_the_whole_migration(make_daemon: MakeDaemon) -> None:
    """256 MiB at 4 MiB/s takes a minute; 1 s per GiB allows a quarter of a second."""
    a, b = make_daemon("a"), make_daemon("b")
    create(a, memory_mib=256, working_set_mib=64, rate=16)
    wait_for(lambda: a.call("vm.show", name="vm1")["guest"]["pages_written"] > 64 * 256, what="the data")
    migratectl(a, "migrate", "vm1", "--to", b.address, "--max-bandwidth", "4", "--completion-timeout-per-gib", "1")
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "failed" and "timed out after 0.25 s" in stats["error"], stats
    assert_runs_here(a, "vm1")


def test_a_stalled_target_trips_the_progress_timeout(make_daemon: MakeDaemon) -> None:
    """The target stops (SIGSTOP) in the bulk copy: once the socket buffers are full nothing moves,
    and after 1 s without a byte sent the source cancels (before the 3 s peer I/O timeout)."""
    a, b = make_daemon("a"), make_daemon("b")
    create(a, memory_mib=256, working_set_mib=128, rate=16)
    wait_for(lambda: a.call("vm.show", name="vm1")["guest"]["pages_written"] > 128 * 256, what="the data")
    migratectl(a, "migrate", "vm1", "--to", b.address, "--max-bandwidth", "16", "--progress-timeout", "1")
    wait_migration(a, "vm1", until=("bulk",))
    assert b.process is not None
    os.kill(b.process.pid, signal.SIGSTOP)
    try:
        stats = wait_migration(a, "vm1")
    finally:
        os.kill(b.process.pid, signal.SIGCONT)
    assert stats["state"] == "failed", stats
    assert "no progress for 1 s" in stats["error"], stats["error"]
    assert_runs_here(a, "vm1")


def test_remaining_counts_down_during_the_bulk_copy_and_the_target_reports_its_own_stats(
    make_daemon: MakeDaemon,
) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    create(a, memory_mib=256, working_set_mib=128, rate=16)
    wait_for(lambda: a.call("vm.show", name="vm1")["guest"]["pages_written"] > 128 * 256, what="the data")
    a.call("migrate", name="vm1", to=b.address, max_bandwidth_mib_s=32)
    first = wait_migration(a, "vm1", until=("bulk",))
    assert first["pages_remaining"] > 128 * 256 // 2, first
    wait_for(
        lambda: (
            (s := a.call("migration.status", name="vm1"))["phase"] != "bulk"
            or s["pages_remaining"] < first["pages_remaining"]
        ),
        what="pages_remaining to move during the bulk copy",
    )
    assert a.call("migration.status", name="vm1")["pages_remaining"] < first["pages_remaining"]
    # The bandwidth is measured while the bulk copy runs (32 MiB/s: it lasts seconds), not after it.
    seen: list[dict[str, Any]] = []
    wait_for(
        lambda: (
            seen.append(s := a.call("migration.status", name="vm1")) or s["phase"] != "bulk" or s["bandwidth_mib_s"] > 0
        ),
        what="the bandwidth during the bulk copy",
    )
    assert seen[-1]["phase"] == "bulk" and seen[-1]["bandwidth_mib_s"] > 0, seen[-1]
    a.call("migration.set", name="vm1", max_bandwidth_mib_s=0)
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    target = wait_migration(b, "vm1")
    assert target["role"] == "target" and target["state"] == "completed", target
    assert target["dirty_tracking"] == stats["dirty_tracking"] != "auto", (target, stats)
    assert target["total_ms"] is not None and target["total_ms"] > 0
    assert target["bandwidth_mib_s"] > 0


def test_a_low_bandwidth_cap_never_leaves_a_stream_silent_past_its_timeout(make_daemon: MakeDaemon) -> None:
    """At 2 MiB/s over 2 streams, a record of max_batch_bytes (8 MiB) taken whole from the limit
    left its stream silent for about 8 s while the other's went, past the receiver's timeout
    (peer.connect_timeout_s, 3 s in these tests): the migration failed with "nothing received".
    Paced in slices, every stream keeps moving and the copy completes at the cap. The guest is
    paused, so 2 MiB/s converges; its 24 MiB of data are contiguous, so the records are full."""
    a, b = make_daemon("a", streams=2, max_batch_bytes=8 << 20), make_daemon("b")
    create(a, memory_mib=64, working_set_mib=24, rate=64)
    wait_for(lambda: a.call("vm.show", name="vm1")["guest"]["pages_written"] > 24 * 256, what="the data")
    a.call("vm.pause", name="vm1")
    assert migratectl(a, "migrate", "vm1", "--to", b.address, "--max-bandwidth", "2").returncode == 0
    stats = wait_migration(a, "vm1", timeout=180)
    assert stats["state"] == "completed", stats
    assert stats["bytes_sent"] > 16 << 20, stats["bytes_sent"]  # precondition: records that fill up
    # The cap held (an upper bound: a slow host only lowers it).
    assert stats["bandwidth_mib_s"] <= 2 * 1.25, stats["bandwidth_mib_s"]
