"""Live migration between two real daemon processes on real KVM (issue: migration over TCP).

Every test ends with the VM running in exactly one place, its guest's heartbeat moving on and no
verification error: the guest checks every page it rewrites against what it wrote before.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from daemons import MakeDaemon
from daemons import DaemonProcess, heartbeat, wait_for, wait_migration

pytestmark = pytest.mark.kvm

MIB = 1 << 20


def create(
    daemon: DaemonProcess,
    name: str = "vm1",
    memory_mib: int = 256,
    vcpus: int = 2,
    rate: float | str = 0.0,
    working_set_mib: int = 64,
) -> dict[str, Any]:
    info: dict[str, Any] = daemon.call(
        "vm.create",
        name=name,
        memory_mib=memory_mib,
        vcpus=vcpus,
        dirty_rate_mib_s=rate,
        working_set_mib=working_set_mib,
    )
    wait_for(lambda: heartbeat(daemon, name) > 0, what="the guest's first heartbeat")
    return info


def guest_write_rate_mib_s(daemon: DaemonProcess, name: str, window_s: float = 1.0) -> float:
    """What the guest writes per second now, over a window (to check a test's precondition)."""
    first, started = daemon.call("vm.show", name=name)["guest"]["pages_written"], time.monotonic()
    time.sleep(window_s)  # a measuring window, not a wait for something to happen
    last, ended = daemon.call("vm.show", name=name)["guest"]["pages_written"], time.monotonic()
    return (last - first) * 4096 / (1 << 20) / (ended - started)


def assert_runs_here(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    """The VM runs on `daemon`: state running, heartbeat rising, no verification error."""
    before = daemon.call("vm.show", name=name)
    assert before["state"] == "running", before
    wait_for(
        lambda: heartbeat(daemon, name) > before["guest"]["heartbeat_generation"] + 5,
        what=f"{name}'s heartbeat to rise on {daemon.name}",
    )
    after = daemon.call("vm.show", name=name)
    assert after["guest"]["verification_errors"] == 0, after
    assert after["error"] is None, after
    return after


def assert_absent(daemon: DaemonProcess, name: str) -> None:
    assert name not in [vm["name"] for vm in daemon.call("vm.list")], daemon.call("vm.list")


def migrate(source: DaemonProcess, target: DaemonProcess, name: str = "vm1", **options: Any) -> dict[str, Any]:
    source.call("migrate", name=name, to=target.address, **options)
    return wait_migration(source, name)


@pytest.mark.parametrize(
    ("label", "rate"),
    [("idle", 0.0), ("moderate", 64.0)],
)
def test_converging_workloads_migrate_there_and_back(make_daemon: MakeDaemon, label: str, rate: float) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    create(a, rate=rate, memory_mib=1024, working_set_mib=256)
    for source, target in ((a, b), (b, a)):
        generation = heartbeat(source, "vm1")
        stats = migrate(source, target)
        assert stats["state"] == "completed", stats
        for key in (
            "total_ms",
            "setup_ms",
            "downtime_ms",
            "bytes_sent",
            "pages_sent",
            "zero_pages",
            "rounds",
            "bandwidth_mib_s",
            "dirty_rate_mib_s",
            "verify_ms",
            "dirty_tracking",
            "backup_bitmap",
        ):
            assert stats.get(key) is not None, (key, stats)
        assert stats["dirty_tracking"] == "ring"
        assert "not in use" in stats["backup_bitmap"] and "R7" in stats["backup_bitmap"]
        assert stats["digest"], "verify = full compares digests before COMMIT"
        assert_absent(source, "vm1")
        shown = assert_runs_here(target, "vm1")
        # The guest's own counters travelled with its RAM: it goes on from where it stopped.
        assert shown["guest"]["heartbeat_generation"] >= generation
        print(
            f"{label} {source.name}->{target.name}: total {stats['total_ms']:.0f} ms, "
            f"downtime {stats['downtime_ms']:.1f} ms, rounds {stats['rounds']}"
        )


def test_full_speed_guest_converges_or_keeps_running_on_the_source(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", max_rounds=8, downtime_limit_ms=50), make_daemon("b")
    create(a, rate="max", memory_mib=1024, working_set_mib=512)
    stats = migrate(a, b)
    if stats["state"] == "completed":
        assert_absent(a, "vm1")
        assert_runs_here(b, "vm1")
    else:
        assert stats["state"] == "failed" and "did not converge" in stats["error"], stats
        assert_runs_here(a, "vm1")
        assert_absent(b, "vm1")
    print(
        f"full speed: {stats['state']}, total {stats.get('total_ms')}, downtime "
        f"{stats.get('downtime_ms')}, rounds {stats['rounds']}, error {stats.get('error')}"
    )


def test_target_killed_during_bulk_copy(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", max_bandwidth_mib_s=64), make_daemon("b")
    create(a, memory_mib=512, rate=32, working_set_mib=400)
    wait_for(
        lambda: a.call("vm.show", name="vm1")["guest"]["pages_written"] > 400 * 256,
        timeout=30,
        what="the working set to be written once",
    )
    a.call("migrate", name="vm1", to=b.address)
    wait_migration(a, "vm1", until=("bulk",))
    time.sleep(0.3)
    b.kill()
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "failed", stats
    assert_runs_here(a, "vm1")


def test_target_refusing_at_loaded_leaves_the_vm_on_the_source(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b", faults="target-refuse-loaded")
    create(a, rate=16)
    stats = migrate(a, b)
    assert stats["state"] == "failed" and "refusing at LOADED" in stats["error"], stats
    assert_runs_here(a, "vm1")
    wait_for(lambda: "vm1" not in [v["name"] for v in b.call("vm.list")], what="b to discard")


def test_link_lost_after_commit_is_resolved_by_asking_the_target(make_daemon: MakeDaemon) -> None:
    """RUNNING never arrives: in doubt; the target, asked, says it runs the VM: released here."""
    a, b = make_daemon("a"), make_daemon("b", faults="target-vanish-after-commit")
    create(a, rate=16)
    a.call("migrate", name="vm1", to=b.address)
    stats = wait_migration(a, "vm1", until=("completed", "failed", "aborted"))
    assert stats["state"] == "completed", stats
    assert '"event": "migration_in_doubt"' in a.log(), "the source must have been in doubt"
    assert '"target_says": "running"' in a.log()
    assert_absent(a, "vm1")
    assert_runs_here(b, "vm1")


def test_commit_lost_on_the_way_is_resolved_by_the_target_aborting_for_good(make_daemon: MakeDaemon) -> None:
    """COMMIT never reaches the target: in doubt; the target, asked, aborts for good; resumed here."""
    a, b = make_daemon("a", faults="source-lose-commit"), make_daemon("b")
    create(a, rate=16)
    a.call("migrate", name="vm1", to=b.address)
    stats = wait_migration(a, "vm1", until=("completed", "failed", "aborted"))
    assert stats["state"] == "aborted", stats
    assert '"target_says": "aborted"' in a.log()
    assert_runs_here(a, "vm1")
    wait_for(lambda: "vm1" not in [v["name"] for v in b.call("vm.list")], what="b to discard")


def test_an_in_doubt_migration_is_published_aborted_only_once_the_vm_runs_here(make_daemon: MakeDaemon) -> None:
    """The target, asked, answers aborted; the resume here is slow (source-resume-slow, 0.5 s).
    Whoever reads "aborted" must find the VM running: it was published before the resume once,
    and a test that read the VM right after the migration's end found it still in doubt."""
    a, b = make_daemon("a", faults="source-lose-commit,source-resume-slow"), make_daemon("b")
    create(a, rate=16)
    a.call("migrate", name="vm1", to=b.address)
    samples = 0
    while True:
        state = a.call("migration.status", name="vm1")["state"]
        vm_state = a.call("vm.show", name="vm1")["state"]
        samples += 1
        if state == "aborted":
            assert vm_state == "running", f"the migration read aborted while the VM was {vm_state}"
            break
        assert state not in ("completed", "failed"), state
        assert samples < 10_000, f"still {state} after {samples} samples"
        time.sleep(0.01)
    wait_for(lambda: '"event": "in_doubt_resolved"' in a.log(), what="the in-doubt resolution")
    assert '"target_says": "aborted"' in a.log()
    assert_runs_here(a, "vm1")


def test_cancel_during_dirty_rounds(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", downtime_limit_ms=1, max_rounds=10000, timeout_s=600), make_daemon("b")
    create(a, rate="max", working_set_mib=128)
    a.call("migrate", name="vm1", to=b.address)
    wait_migration(a, "vm1", until=("rounds",))
    wait_for(lambda: a.call("migration.status", name="vm1")["round"] >= 2, what="two rounds")
    a.call("migration.cancel", name="vm1")
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "cancelled", stats
    assert_runs_here(a, "vm1")
    wait_for(lambda: "vm1" not in [v["name"] for v in b.call("vm.list")], what="b to discard")


def test_full_speed_guest_converges_when_throttled(make_daemon: MakeDaemon) -> None:
    """on_no_convergence = "throttle": after max_rounds the vCPUs are held paused for a growing
    share of the time until the predicted downtime fits; the guest loses nothing by it."""
    # The precondition is forced, not hoped for: the link is capped at 64 MiB/s, or at two thirds
    # of what the guest writes when the host is too busy to run it at 96 MiB/s (it writes over
    # 1 GiB/s on a quiet host, hundreds of MiB/s beside a CPU hog, 75 MiB/s was seen at load 9),
    # so a round that resends the 32 MiB working set takes long enough for the unthrottled guest
    # to rewrite all of it: only throttling converges. Held at 90-99% it dirties a tenth or less
    # of that: a few MiB a round, under the 400 ms limit even at the lowest cap. A host too busy
    # to run the guest at 24 MiB/s cannot show this, and the test says so instead of passing for
    # the wrong reason.
    a = make_daemon("a", max_rounds=3, downtime_limit_ms=400, on_no_convergence="throttle")
    b = make_daemon("b")
    create(a, rate="max", memory_mib=256, working_set_mib=32)
    rate_mib_s = guest_write_rate_mib_s(a, "vm1")
    cap_mib_s = min(64, int(rate_mib_s / 1.5))
    assert cap_mib_s >= 16, f"precondition: the guest writes only {rate_mib_s:.0f} MiB/s, under 1.5 times 16 MiB/s"
    stats = migrate(a, b, max_bandwidth_mib_s=cap_mib_s)
    assert stats["state"] == "completed", stats["error"]
    assert stats["throttle_percent"] >= 30, {
        k: stats[k]
        for k in (
            "rounds",
            "predicted_downtime_ms",
            "downtime_ms",
            "final_pages",
            "dirty_rate_mib_s",
            "bandwidth_mib_s",
        )
    }
    assert_absent(a, "vm1")
    assert_runs_here(b, "vm1")
    print(
        f"throttled: {stats['throttle_percent']}%, rounds {stats['rounds']}, downtime "
        f"{stats['downtime_ms']:.1f} ms, total {stats['total_ms']:.0f} ms"
    )
