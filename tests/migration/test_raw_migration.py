"""A guest nobody here wrote the daemon for: a raw boot sector (real mode, then 32-bit protected
mode, all of it run by PVM's instruction emulator), its UART console, and live migration of it.

The boot sector stamps every 4-byte word of its region with (pass, address) in a tight loop and
prints "pass N" on COM1. Emulated writes push one ring entry each (HOST-NOTES: QEMU's ring mode
lost such writes on this host): the target's memory must be exact, word by word.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from daemons import MakeDaemon
from daemons import REPO, DaemonProcess, wait_for, wait_migration
from migrated.guests.x86_64.bootsector import BootSectorParams, check_region
from migrated.guests.x86_64.bootsector.build import build_boot_sector, write_image

pytestmark = pytest.mark.kvm

MIB = 1 << 20


def migratectl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrated.cli", "--socket", str(daemon.socket), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )


def passes(daemon: DaemonProcess, name: str) -> list[int]:
    out = daemon.call("vm.console", name=name)["output"]
    return [int(n) for n in re.findall(r"pass (\d+)\n", out)]


def test_boot_sector_console_and_migration(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    params = BootSectorParams(bytes=1 * MIB)
    image = tmp_path / "boot.bin"
    write_image(image, build_boot_sector(params))
    a, b = make_daemon("a"), make_daemon("b")
    created = migratectl(a, "vm", "create", "bs", "--memory", "64", "--guest", "raw", "--image", str(image))
    assert created.returncode == 0, created.stderr
    wait_for(lambda: len(passes(a, "bs")) >= 2, what="two pass lines on a")
    console = migratectl(a, "vm", "console", "bs")
    assert console.stdout.startswith("migrated boot sector\nprotected mode\npass 1\n"), console.stdout
    moved = migratectl(a, "migrate", "bs", "--to", b.address, "--wait")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    before = passes(b, "bs")
    wait_for(lambda: len(passes(b, "bs")) >= len(before) + 2, what="more pass lines on b")
    after = passes(b, "bs")
    assert after == list(range(1, len(after) + 1)), "lines lost or repeated across the migration"
    log_a = (tmp_path / "a-state" / "console" / "bs.log").read_bytes()
    log_b = (tmp_path / "b-state" / "console" / "bs.log").read_bytes()
    assert log_a.startswith(b"migrated boot sector\n") and log_b.startswith(b"pass ")
    status = json.loads(migratectl(a, "migration", "status", "bs", "--json").stdout)
    assert status["state"] == "completed" and status["dirty_tracking"] == "ring"


def test_emulated_writes_over_100_mib_migrate_exactly(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """Ring mode, ~100 MiB rewritten in a tight emulated loop; checked in a dump of the paused
    target: every word holds the pass it was last written in, in address order."""
    params = BootSectorParams(bytes=100 * MIB, print_every=1)
    image = tmp_path / "boot.bin"
    write_image(image, build_boot_sector(params))
    a, b = make_daemon("a"), make_daemon("b")
    created = migratectl(a, "vm", "create", "big", "--memory", "256", "--guest", "raw", "--image", str(image))
    assert created.returncode == 0, created.stderr
    wait_for(lambda: "protected mode" in a.call("vm.console", name="big")["output"], what="protected mode")
    a.call("migrate", name="big", to=b.address)
    stats = wait_migration(a, "big")
    assert stats["state"] == "completed", stats["error"]
    assert stats["dirty_tracking"] == "ring" and stats["ring_full_exits"] == 0
    b.call("vm.pause", name="big")
    b.call("vm.dump", name="big", file=str(tmp_path / "b.bin"))
    ram = np.fromfile(tmp_path / "b.bin", np.uint8)
    check = check_region(ram, params)
    assert check.bad_words == 0, check
    assert check.newer_words > 0 or check.passes_done > 0, check
    b.call("vm.resume", name="big")
    info = b.call("vm.show", name="big")
    assert info["state"] == "running" and info["error"] is None


def _new_pass_line(daemon: DaemonProcess, seen: int) -> Callable[[], bool]:
    return lambda: len(passes(daemon, "pp")) > seen


def test_a_ping_pong_keeps_memory_exact_with_the_cpuid_set_at_the_build(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """Three migrations there and back (each target built with the source's CPUID from the VM
    description, its restore leaving it set), verify off as the benchmarks run them: the guest's
    region checks out word for word in a dump of the last target, and the guest carries on."""
    params = BootSectorParams(bytes=2 * MIB, print_every=1)
    image = tmp_path / "boot.bin"
    write_image(image, build_boot_sector(params))
    a, b = make_daemon("a", verify="off"), make_daemon("b", verify="off")
    created = migratectl(a, "vm", "create", "pp", "--memory", "64", "--guest", "raw", "--image", str(image))
    assert created.returncode == 0, created.stderr
    wait_for(lambda: len(passes(a, "pp")) >= 2, what="two pass lines on a")
    for source, target in ((a, b), (b, a), (a, b)):
        source.call("migrate", name="pp", to=target.address)
        stats = wait_migration(source, "pp")
        assert stats["state"] == "completed", stats["error"]
        wait_for(_new_pass_line(target, len(passes(target, "pp"))), what=f"a new pass line on {target.name}")
    b.call("vm.pause", name="pp")
    b.call("vm.dump", name="pp", file=str(tmp_path / "b.bin"))
    check = check_region(np.fromfile(tmp_path / "b.bin", np.uint8), params)
    assert check.bad_words == 0, check
    assert check.passes_done > 0, check
    b.call("vm.resume", name="pp")
    info = b.call("vm.show", name="pp")
    assert info["state"] == "running" and info["error"] is None, info
