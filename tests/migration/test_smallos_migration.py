"""The whole machine moves: the small-OS guest (interrupts, timers, IPIs, kvmclock, vector
registers, MSRs, atomic invariants) migrated between daemons keeps every check clean."""

from __future__ import annotations

from typing import Any

import pytest

from daemons import MakeDaemon
from daemons import DaemonProcess, wait_for, wait_migration
from test_migration import assert_absent

pytestmark = pytest.mark.kvm


def kernel(daemon: DaemonProcess, name: str = "os1") -> dict[str, Any]:
    info = daemon.call("vm.show", name=name)
    assert info["state"] == "running" and info["error"] is None, info
    assert info["guest"]["verification_errors"] == 0, info["guest"]
    smallos: dict[str, Any] = info["guest"]["smallos"]
    assert smallos["errors"] == {}, smallos
    return smallos


def assert_machine_alive(daemon: DaemonProcess, vcpus: int) -> None:
    """Ticks on every vCPU, IPIs on vCPU 1, injected IRQs and PIT interrupts keep arriving."""
    before = kernel(daemon)

    def moved() -> bool:
        now = kernel(daemon)
        return (
            all(n > b + 20 for n, b in zip(now["ticks"], before["ticks"]))
            and now["irqs"] > before["irqs"] + 2
            and now["pit_ticks"] > before["pit_ticks"] + 10
            and now["reg_checks"] > before["reg_checks"]
            and (vcpus < 2 or now["ipis"][1] > before["ipis"][1] + 10)
        )

    wait_for(moved, timeout=20, what=f"the small OS's counters to move on {daemon.name}")


@pytest.mark.parametrize("vcpus", [1, 2])
def test_small_os_migrates_there_and_back(make_daemon: MakeDaemon, vcpus: int) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    a.call(
        "vm.create", name="os1", memory_mib=128, vcpus=vcpus, guest="smallos", dirty_rate_mib_s=32, working_set_mib=32
    )
    wait_for(lambda: kernel(a)["ticks"][0] > 10, what="the small OS to tick")
    assert_machine_alive(a, vcpus)
    for source, target in ((a, b), (b, a)):
        source.call("migrate", name="os1", to=target.address)
        stats = wait_migration(source, "os1")
        assert stats["state"] == "completed", stats["error"]
        assert_absent(source, "os1")
        assert_machine_alive(target, vcpus)


def test_small_os_keeps_running_when_the_target_dies(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a", max_bandwidth_mib_s=32)
    b = make_daemon("b")
    a.call("vm.create", name="os1", memory_mib=256, vcpus=2, guest="smallos", dirty_rate_mib_s=64, working_set_mib=128)
    wait_for(
        lambda: a.call("vm.show", name="os1")["guest"]["pages_written"] > 128 * 256,
        timeout=30,
        what="the working set to be written once",
    )
    a.call("migrate", name="os1", to=b.address)
    wait_migration(a, "os1", until=("bulk",))
    b.kill()
    stats = wait_migration(a, "os1")
    assert stats["state"] == "failed", stats
    assert_machine_alive(a, 2)


def test_the_map_form_of_an_older_source_still_restores(make_daemon: MakeDaemon) -> None:
    """A source that sends the machine state in its map form (fault source-map-state, as one
    older than the flat-machine-state capability): the target restores it, the whole machine
    carries on, and its log names the form it restored."""
    a, b = make_daemon("a", faults="source-map-state"), make_daemon("b")
    a.call("vm.create", name="os1", memory_mib=128, vcpus=2, guest="smallos", dirty_rate_mib_s=32, working_set_mib=32)
    wait_for(lambda: kernel(a)["ticks"][0] > 10, what="the small OS to tick")
    a.call("migrate", name="os1", to=b.address)
    stats = wait_migration(a, "os1")
    assert stats["state"] == "completed", stats["error"]
    assert_machine_alive(b, 2)
    wait_for(lambda: '"event": "cutover_timeline"' in b.log(), what="b's cutover_timeline")
    assert '"state_kind": "x86-machine"' in b.log()


def test_a_migration_that_drops_xsave_is_caught_by_the_guest(make_daemon: MakeDaemon) -> None:
    """The negative test: a test-only source (fault source-zero-xsave) loses the vector
    registers; the small OS's own checks count the mismatches on the target.

    A vCPU paused between a check's store and its next load loses nothing it will read again, and
    cannot notice; every vCPU so placed is rare but possible, so the VM moves on (both daemons
    lose the registers) until the guest noticed, at most three times. Each time the target's
    guest must have run 20 more checks on a running VM, so a guest that stopped checking fails
    here, named, rather than passing by silence."""
    a, b = make_daemon("a", faults="source-zero-xsave"), make_daemon("b", faults="source-zero-xsave")
    a.call("vm.create", name="os1", memory_mib=128, vcpus=2, guest="smallos", dirty_rate_mib_s=16, working_set_mib=16)
    wait_for(lambda: kernel(a)["reg_checks"] > 10, what="register checks on a")

    def smallos(daemon: DaemonProcess) -> dict[str, Any]:
        info = daemon.call("vm.show", name="os1")
        assert info["state"] == "running" and info["error"] is None, info
        found: dict[str, Any] = info["guest"]["smallos"]
        return found

    def checked_on(daemon: DaemonProcess, checks: int) -> dict[str, Any]:
        wait_for(lambda: smallos(daemon)["reg_checks"] >= checks, what=f"20 more register checks on {daemon.name}")
        return smallos(daemon)

    seen = []
    for source, target in ((a, b), (b, a), (a, b)):
        source.call("migrate", name="os1", to=target.address)
        stats = wait_migration(source, "os1")
        assert stats["state"] == "completed", stats["error"]
        after = checked_on(target, smallos(target)["reg_checks"] + 20)
        if after["reg_mismatches"] > 0:
            return
        seen.append({"to": target.name, "reg_checks": after["reg_checks"], "errors": after["errors"]})
    raise AssertionError(f"three migrations without the XSAVE area, and the guest noticed nothing: {seen}")
