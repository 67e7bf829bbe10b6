"""Operator inspection: vm pause, vm resume, vm dump (guest-physical memory to a file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daemons import MakeDaemon, wait_migration
from helpers import wait_for
from migrated.guests.workload import plan_layout, verify_pages
from test_migration import assert_runs_here, create, heartbeat

pytestmark = pytest.mark.kvm

MIB = 1 << 20


def test_pause_dump_resume(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    a = make_daemon("a")
    create(a, memory_mib=64, vcpus=2, rate=32, working_set_mib=16)
    with pytest.raises(Exception, match="pause it first"):
        a.call("vm.dump", name="vm1", file=str(tmp_path / "x"))
    shown = a.call("vm.pause", name="vm1")
    assert shown["state"] == "paused"
    frozen = heartbeat(a, "vm1")
    # A second guest is the witness that guests were given time to run meanwhile: a fixed sleep
    # would pass for the wrong reason on a host too busy to run anything.
    create(a, name="witness", memory_mib=16, vcpus=1, working_set_mib=4)
    witness = heartbeat(a, "witness")
    wait_for(lambda: heartbeat(a, "witness") > witness + 20, what="the witness guest to run")
    assert heartbeat(a, "vm1") == frozen, "a paused guest does not run"
    a.call("vm.stop", name="witness")
    dump = tmp_path / "ram.bin"
    allocated = a.call("vm.show", name="vm1")["memory_allocated_bytes"]
    result = a.call("vm.dump", name="vm1", file=str(dump))
    assert result["length"] == 64 * MIB
    # The dump reads the RAM file's holes as zeros, without allocating them on the host (the
    # next migration would read them all back), and leaves them holes in its file.
    assert a.call("vm.show", name="vm1")["memory_allocated_bytes"] == allocated
    assert dump.stat().st_blocks * 512 < 64 * MIB
    ram = np.fromfile(dump, np.uint8)
    report = verify_pages(ram, plan_layout(64 * MIB, 2, 16 * MIB))
    assert report.ok and report.pages_written > 0, report
    part = tmp_path / "part.bin"
    a.call("vm.dump", name="vm1", file=str(part), start=0x200000, length=8192)
    np.testing.assert_array_equal(np.fromfile(part, np.uint8), ram[0x200000 : 0x200000 + 8192])
    with pytest.raises(Exception, match="must lie inside guest RAM"):
        a.call("vm.dump", name="vm1", file=str(part), start=63 * MIB, length=2 * MIB)
    a.call("vm.resume", name="vm1")
    assert_runs_here(a, "vm1")


def test_a_paused_vm_migrates_paused_with_identical_memory(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    create(a, memory_mib=128, vcpus=2, rate=64, working_set_mib=64)
    a.call("vm.pause", name="vm1")
    a.call("vm.dump", name="vm1", file=str(tmp_path / "a.bin"))
    a.call("migrate", name="vm1", to=b.address)
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    assert b.call("vm.show", name="vm1")["state"] == "paused"
    b.call("vm.dump", name="vm1", file=str(tmp_path / "b.bin"))
    before, after = np.fromfile(tmp_path / "a.bin", np.uint8), np.fromfile(tmp_path / "b.bin", np.uint8)
    differing = np.flatnonzero((before != after).reshape(-1, 4096).any(axis=1))
    assert differing.size == 0, f"pages differ after migration: {differing[:10]}"
    b.call("vm.resume", name="vm1")
    assert_runs_here(b, "vm1")


def test_migratectl_vm_dump_streams_the_bytes_and_writes_the_file_itself(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """The daemon streams the range over the control socket and migratectl writes it (a daemon
    under ProtectSystem/PrivateTmp could not write where the operator is); the same bytes as the
    daemon-side dump, and nothing left behind when the range is refused."""
    from test_daemon_service import migratectl

    a = make_daemon("a")
    create(a, memory_mib=64, vcpus=1, rate=16, working_set_mib=16)
    a.call("vm.pause", name="vm1")
    a.call("vm.dump", name="vm1", file=str(tmp_path / "daemon.bin"))
    done = migratectl(a, "vm", "dump", "vm1", str(tmp_path / "client.bin"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["length"] == 64 * MIB
    assert (tmp_path / "client.bin").read_bytes() == (tmp_path / "daemon.bin").read_bytes()
    part = migratectl(a, "vm", "dump", "vm1", str(tmp_path / "part.bin"), "--start", "0x200000", "--length", "8192")
    assert part.returncode == 0, part.stderr
    assert (tmp_path / "part.bin").read_bytes() == (tmp_path / "daemon.bin").read_bytes()[0x200000 : 0x200000 + 8192]
    refused = migratectl(
        a, "vm", "dump", "vm1", str(tmp_path / "no.bin"), "--start", str(63 * MIB), "--length", str(2 * MIB)
    )
    assert refused.returncode != 0 and "must lie inside guest RAM" in refused.stderr, refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".bin") or "partial" in p.name) == [
        "client.bin",
        "daemon.bin",
        "part.bin",
    ]
    a.call("vm.resume", name="vm1")
