"""on_no_convergence = "dirty-limit" between two real daemons on real KVM: a 2-vCPU guest whose
vCPU 0 rewrites its share as fast as it can and whose vCPU 1 dirties slowly, over a link capped
below vCPU 0's rate. Only the limit makes it converge; it holds vCPU 0, leaves vCPU 1 alone, the
memory arrives exact (verify full), and no limit is left on after the migration, or after a
failed one."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from daemons import DaemonProcess, MakeDaemon, wait_for, wait_migration
from test_migration import assert_absent, assert_runs_here, create, migrate

pytestmark = pytest.mark.kvm

MIB = 1 << 20
SLOW_MIB_S = 0.5
WORKING_SET_MIB = 32  # 16 MiB a vCPU
MIN_CAP_MIB_S = 6


def per_vcpu_rates_mib_s(daemon: DaemonProcess, name: str, window_s: float = 1.0) -> list[float]:
    """What each vCPU writes per second now, over a window (to check the test's precondition)."""
    first, started = daemon.call("vm.show", name=name)["guest"]["pages_written_per_vcpu"], time.monotonic()
    time.sleep(window_s)  # a measuring window, not a wait for something to happen
    last, ended = daemon.call("vm.show", name=name)["guest"]["pages_written_per_vcpu"], time.monotonic()
    return [(b - a) * 4096 / MIB / (ended - started) for a, b in zip(first, last, strict=True)]


def fast_and_slow_guest(daemon: DaemonProcess) -> tuple[list[float], float, float]:
    """The guest, its rates checked, and the link cap and downtime limit that make it unable to
    converge without a limit: vCPU 0 far over the cap, vCPU 1 far under its fair share.

    The cap follows vCPU 0's measured rate (a third of it), so a host made slow by a CPU hog
    gives a slower link rather than a test that cannot show anything: over 1.5 times the cap,
    vCPU 0 rewrites its whole 16 MiB share within the round that resends it, and the limit is set
    so that the share takes 1.7 times the limit to send. Only holding vCPU 0 can converge."""
    create(daemon, rate="max", memory_mib=128, working_set_mib=WORKING_SET_MIB)
    daemon.call("vm.set", name="vm1", dirty_rate_mib_s=SLOW_MIB_S, vcpu=1)
    rates = per_vcpu_rates_mib_s(daemon, "vm1")
    cap = min(32.0, max(MIN_CAP_MIB_S, rates[0] / 3))
    assert rates[0] > 1.5 * cap, f"precondition: vCPU 0 writes only {rates[0]:.1f} MiB/s; the host is too busy"
    assert rates[1] < 2 * SLOW_MIB_S, f"precondition: vCPU 1 writes {rates[1]:.1f} MiB/s, not about {SLOW_MIB_S}"
    limit_ms = round(0.6 * (WORKING_SET_MIB / 2) / cap * 1000)
    return rates, cap, limit_ms


def log_events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    events = []
    for line in daemon.log().splitlines():
        if f'"event": "{name}"' in line:
            events.append(json.loads(line))
    return events


def assert_no_limit_left(daemon: DaemonProcess, name: str = "vm1") -> None:
    info = daemon.call("vm.show", name=name)
    assert info["vcpu_throttle_percent"] == [0.0, 0.0], info["vcpu_throttle_percent"]


def test_dirty_limit_holds_the_fast_vcpu_and_converges(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", max_rounds=3), make_daemon("b")
    rates, cap, limit_ms = fast_and_slow_guest(a)
    stats = migrate(a, b, on_no_convergence="dirty-limit", max_bandwidth_mib_s=cap, downtime_limit_ms=limit_ms)
    assert stats["state"] == "completed", stats["error"]
    assert stats["rounds"] > 3, "the limit engages only after max_rounds: it must have been needed"
    assert stats["dirty_limited_vcpus"] == [0], stats["dirty_limits"]
    assert [limit["vcpu"] for limit in stats["dirty_limits"]] == [0], stats["dirty_limits"]
    held_to = stats["dirty_limits"][0]["limit_mib_s"]
    assert 0 < held_to < cap, stats["dirty_limits"]
    set_events = log_events(a, "dirty_limit_set")
    assert set_events and {e["vcpu"] for e in set_events} == {0}, set_events
    assert log_events(a, "dirty_limits_lifted"), "the limit must be lifted, and say so"
    assert_absent(a, "vm1")
    assert_runs_here(b, "vm1")
    assert_no_limit_left(b)
    print(
        f"dirty-limit: vCPU rates {[round(r, 1) for r in rates]} MiB/s, cap {cap:.1f} MiB/s, limit {limit_ms} ms, "
        f"vCPU 0 held to {held_to} MiB/s, "
        f"rounds {stats['rounds']}, downtime {stats['downtime_ms']:.1f} ms, total {stats['total_ms']:.0f} ms"
    )


def test_dirty_limit_that_cannot_converge_fails_and_lifts_every_limit(make_daemon: MakeDaemon) -> None:
    """A 1 ms limit no quota can meet: vCPU 0 ends held at the maximum share, the policy gives
    up, and the VM runs on here with no vCPU held."""
    a, b = make_daemon("a", max_rounds=2), make_daemon("b")
    _, cap, _ = fast_and_slow_guest(a)
    a.call(
        "migrate",
        name="vm1",
        to=b.address,
        on_no_convergence="dirty-limit",
        max_bandwidth_mib_s=cap,
        downtime_limit_ms=1,
    )
    wait_for(
        lambda: (
            a.call("migration.status", name="vm1")["dirty_limits"]
            or a.call("migration.status", name="vm1")["state"] in ("failed", "completed")
        ),
        60.0,
        "a dirty limit in force",
    )
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "failed" and "did not converge" in stats["error"], stats
    assert 0 in stats["dirty_limited_vcpus"], stats
    assert log_events(a, "dirty_limits_lifted"), "the limit must be lifted, and say so"
    assert_no_limit_left(a)
    assert_runs_here(a, "vm1")
    wait_for(lambda: "vm1" not in [v["name"] for v in b.call("vm.list")], what="b to discard")
