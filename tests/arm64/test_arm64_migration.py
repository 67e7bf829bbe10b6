"""arm64: a live migration between two daemons inside the emulated arm64 machine, real arm64 KVM.

The seed's scenario end to end: the vGIC ITS writes its tables into guest RAM during the downtime
with no vCPU running (R6.3), only the backup dirty bitmap sees those pages (R6.4, collected last),
and they must reach the target, whose ITS is restored from them (R9). The guest programs the ITS
and counts the LPIs it receives: they must keep arriving after the migration.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "migration"))

from daemons import DaemonProcess, wait_for, wait_migration  # noqa: E402

pytestmark = pytest.mark.arm64

MIB = 1 << 20


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    key = tmp_path / "peer.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    started: list[DaemonProcess] = []

    def make(name: str, faults: str = "") -> DaemonProcess:
        config = tmp_path / f"{name}.toml"
        # The emulated machine is slow: generous link timeouts, no tight downtime limit.
        config.write_text("[peer]\nconnect_timeout_s = 60\n[migration]\ndowntime_limit_ms = 5000\n")
        daemon = DaemonProcess(name, tmp_path, key, extra_args=("--config", str(config)), faults=faults)
        started.append(daemon)
        return daemon.start(timeout=120)

    yield make
    for daemon in started:
        daemon.stop()


def guest(daemon: DaemonProcess, name: str = "vm1") -> dict[str, Any]:
    info: dict[str, Any] = daemon.call("vm.show", name=name)
    assert info["error"] is None, info
    return info["guest"]


def lpis_arrive(daemon: DaemonProcess, timeout: float = 60.0) -> None:
    before = guest(daemon)["lpis_received"]
    wait_for(
        lambda: guest(daemon)["lpis_received"] > before + 3, timeout=timeout, what=f"LPIs to arrive on {daemon.name}"
    )


def its_tables(path: Path, layout: Any) -> dict[str, bytes]:
    ram = np.fromfile(path, np.uint8)
    tables = {}
    for name, (gpa, size) in layout.kvm_written_tables().items():
        if name == "lpi pending table":
            continue  # pending bits change as LPIs come and go
        start = gpa - layout.ram_base
        tables[name] = ram[start : start + size].tobytes()
    return tables


def test_its_tables_travel_in_the_backup_bitmap(daemons: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    from migrated.hosted import VmSpec

    a, b = daemons("a"), daemons("b")
    a.call("vm.create", name="vm1", memory_mib=64, vcpus=1, dirty_rate_mib_s=2, working_set_mib=8)
    wait_for(lambda: guest(a)["heartbeat_generation"] > 0, timeout=60, what="the guest to start")
    lpis_arrive(a)
    a.call("migrate", name="vm1", to=b.address)
    stats = wait_migration(a, "vm1", timeout=300)
    assert stats["state"] == "completed", stats["error"]
    assert stats["dirty_tracking"] == "ring"
    assert stats["backup_bitmap"].startswith("used"), stats["backup_bitmap"]
    # The ITS save's pages: seen by the bitmap only, and sent.
    assert stats["backup_bitmap_added"] >= 1, stats
    assert b.call("vm.show", name="vm1")["state"] == "running"
    assert guest(b)["verification_errors"] == 0
    lpis_arrive(b)
    before = guest(b)["heartbeat_generation"]
    wait_for(lambda: guest(b)["heartbeat_generation"] > before, timeout=60, what="heartbeats on b")

    # Read the ITS back through the ITS: B's copy, restored from A's saved tables, is saved again
    # by B's ITS on the way back; the tables must come out the same.
    layout = VmSpec("vm1", 64, 1, dirty_rate_mib_s=2, working_set_mib=8).plan_layout()
    b.call("vm.pause", name="vm1")
    b.call("vm.dump", name="vm1", file=str(tmp_path / "b.bin"), start=layout.ram_base)
    b.call("migrate", name="vm1", to=a.address)
    back = wait_migration(b, "vm1", timeout=300)
    assert back["state"] == "completed", back["error"]
    a.call("vm.dump", name="vm1", file=str(tmp_path / "a.bin"), start=layout.ram_base)
    from_a, from_b = its_tables(tmp_path / "b.bin", layout), its_tables(tmp_path / "a.bin", layout)
    for name in from_a:
        assert any(from_a[name]), f"{name} is empty: the ITS save wrote nothing there"
        assert from_a[name] == from_b[name], f"{name} differs after a round trip through B's ITS"
    a.call("vm.resume", name="vm1")
    lpis_arrive(a)
    assert guest(a)["verification_errors"] == 0


def test_without_the_its_save_the_target_loses_the_interrupts(daemons: Callable[..., DaemonProcess]) -> None:
    """The negative test: a source that leaves out the ITS save (test fault) ships a guest whose
    interrupt translation is gone; the guest's own count shows it."""
    a, b = daemons("a", faults="source-skip-its-save"), daemons("b")
    a.call("vm.create", name="vm1", memory_mib=64, vcpus=1, dirty_rate_mib_s=2, working_set_mib=8)
    wait_for(lambda: guest(a)["heartbeat_generation"] > 0, timeout=60, what="the guest to start")
    # How many heartbeats a healthy guest needs for a few LPIs: the yardstick for "long enough"
    # on the target below, in the guest's own time rather than the host's clock.
    hb_before = guest(a)["heartbeat_generation"]
    lpis_arrive(a)
    healthy_span = guest(a)["heartbeat_generation"] - hb_before
    a.call("migrate", name="vm1", to=b.address)
    stats = wait_migration(a, "vm1", timeout=300)
    assert stats["state"] == "completed", (
        f"the fault must give a migration that completes without the ITS tables, got: {stats}"
    )
    received = guest(b)["lpis_received"]
    heartbeat = guest(b)["heartbeat_generation"]
    wait_for(
        lambda: guest(b)["heartbeat_generation"] > heartbeat + 3 * healthy_span + 50,
        timeout=120,
        what="the guest to run on b for three times what LPIs took on a",
    )
    assert guest(b)["lpis_received"] == received, "LPIs arrived although the ITS tables never did"
