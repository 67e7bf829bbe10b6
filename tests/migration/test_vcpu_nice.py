"""A migrating guest's vCPU threads yield the CPU to the migration (`migration.vcpu_nice`,
`migration.vcpu_sched_idle_s`, migrated/vcpupriority.py): real daemons and vCPU threads, their
nice values read from /proc and their policies from the kernel.

Python 3.11 does not name OS threads, so the vCPU threads are told apart by their nice value (or
their policy): no other thread of a daemon changes its own nice value or goes under SCHED_IDLE.
The precondition (none at the value before the migration) is asserted, not assumed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import MakeDaemon
from daemons import DaemonProcess, wait_for, wait_migration
from test_migration import assert_runs_here, create

from migrated.vcpupriority import YieldingVcpus, probe_nice_restore

NICE = 10


def thread_nices(daemon: DaemonProcess) -> list[int]:
    """The nice value of every thread of the daemon's process."""
    assert daemon.process is not None
    nices = []
    for task in Path(f"/proc/{daemon.process.pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        # Field 19 is the nice value; fields 3 on follow the ")" that ends the command name.
        nices.append(int(stat.rsplit(")", 1)[1].split()[16]))
    return nices


def at_nice(daemon: DaemonProcess) -> int:
    return thread_nices(daemon).count(NICE)


def thread_policies(daemon: DaemonProcess) -> list[int]:
    """The scheduling policy of every thread of the daemon's process."""
    assert daemon.process is not None
    policies = []
    for task in Path(f"/proc/{daemon.process.pid}/task").iterdir():
        try:
            policies.append(os.sched_getscheduler(int(task.name)) & ~os.SCHED_RESET_ON_FORK)
        except ProcessLookupError:
            continue
    return policies


def under_sched_idle(daemon: DaemonProcess) -> int:
    return thread_policies(daemon).count(os.SCHED_IDLE)


@pytest.mark.kvm
def test_the_vcpus_yield_while_migrating_and_get_their_priority_back_when_cancelled(make_daemon: MakeDaemon) -> None:
    # SCHED_IDLE for the whole migration: this test does not race its bound (the next one does).
    a = make_daemon("a", downtime_limit_ms=1, max_rounds=10000, timeout_s=600, vcpu_nice=NICE, vcpu_sched_idle_s=600)
    b = make_daemon("b")
    create(a, rate="max", working_set_mib=64, vcpus=2)
    assert at_nice(a) == 0, f"precondition: a thread of a is at nice {NICE} already: {thread_nices(a)}"
    assert under_sched_idle(a) == 0, f"precondition: a thread of a is under SCHED_IDLE: {thread_policies(a)}"
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: at_nice(a) == 2, what=f"the 2 vCPU threads at nice {NICE}")
    wait_for(lambda: under_sched_idle(a) == 2, what="the 2 vCPU threads under SCHED_IDLE")
    wait_for(lambda: a.call("migration.status", name="vm1")["round"] >= 1, what="a dirty round")
    status = a.call("migration.status", name="vm1")
    assert status["vcpu_nice"] == NICE and status["vcpu_sched_idle"] is True, status
    a.call("migration.cancel", name="vm1")
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "cancelled", stats
    # Published last, after the resume: the threads had their value back before the guest ran.
    assert at_nice(a) == 0, thread_nices(a)
    assert under_sched_idle(a) == 0, thread_policies(a)
    assert_runs_here(a, "vm1")


@pytest.mark.kvm
def test_the_vcpus_are_under_their_own_policy_again_for_the_pause(make_daemon: MakeDaemon) -> None:
    """cutover-holds stops the source 0.3 s before it describes the VM (the vCPUs yield from the
    migration's start) and again once paused with the state saved: SCHED_IDLE at the first, their
    own policy at the nice value at the second, so that the pause never waits for a core."""
    a, b = make_daemon("a", faults="cutover-holds", vcpu_nice=NICE, vcpu_sched_idle_s=600), make_daemon("b")
    create(a, rate=16, vcpus=2)
    assert under_sched_idle(a) == 0 and at_nice(a) == 0, (thread_policies(a), thread_nices(a))
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: '"point": "setup"' in a.log(), what="the source to hold before the description")
    assert under_sched_idle(a) == 2, thread_policies(a)
    wait_for(lambda: '"point": "downtime"' in a.log(), what="the source to pause and hold")
    assert under_sched_idle(a) == 0, thread_policies(a)
    assert at_nice(a) == 2, thread_nices(a)
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed" and stats["vcpu_sched_idle"] is True, stats
    assert_runs_here(b, "vm1")


@pytest.mark.kvm
def test_sched_idle_ends_after_its_bound_while_the_migration_goes_on(make_daemon: MakeDaemon) -> None:
    """On a busy host a SCHED_IDLE guest gets almost no CPU: after vcpu_sched_idle_s the vCPU
    threads are back under their own policy, at the nice value, while the migration (a guest
    that never converges under a 1 ms limit) is still copying."""
    a = make_daemon("a", downtime_limit_ms=1, max_rounds=10000, timeout_s=600, vcpu_nice=NICE, vcpu_sched_idle_s=0.2)
    b = make_daemon("b")
    create(a, rate="max", working_set_mib=64, vcpus=2)
    assert under_sched_idle(a) == 0, f"precondition: a thread of a is under SCHED_IDLE: {thread_policies(a)}"
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: a.call("migration.status", name="vm1")["vcpu_sched_idle"] is True, what="the vCPUs' yield")
    wait_for(lambda: under_sched_idle(a) == 0 and at_nice(a) == 2, what="the vCPUs back at nice, SCHED_IDLE over")
    assert a.call("migration.status", name="vm1")["state"] in ("setup", "bulk", "rounds"), "still copying"
    a.call("migration.cancel", name="vm1")
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "cancelled", stats
    assert at_nice(a) == 0 and under_sched_idle(a) == 0, (thread_nices(a), thread_policies(a))
    assert_runs_here(a, "vm1")


@pytest.mark.kvm
def test_a_completed_migration_leaves_the_targets_vcpus_at_their_normal_priority(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", vcpu_nice=NICE), make_daemon("b", vcpu_nice=NICE)
    create(a, rate=8, working_set_mib=16, vcpus=2)
    a.call("migrate", name="vm1", to=b.address)
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    assert stats["vcpu_nice"] == NICE
    assert_runs_here(b, "vm1")
    assert at_nice(b) == 0, thread_nices(b)


@pytest.mark.kvm
def test_at_zero_and_without_sched_idle_the_vcpus_are_left_alone(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", vcpu_nice=0, vcpu_sched_idle_s=0), make_daemon("b")
    create(a, rate=8, working_set_mib=16, vcpus=2)
    a.call("migrate", name="vm1", to=b.address)
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    assert stats["vcpu_nice"] == 0 and stats["vcpu_sched_idle"] is False, stats


def test_a_thread_is_lowered_and_restored_and_one_already_lower_is_left_alone() -> None:
    assert probe_nice_restore() is None, "precondition: run as root (CAP_SYS_NICE)"
    ready, done = threading.Barrier(3), threading.Event()
    ids: list[int] = []

    def park(nice: int) -> None:
        ids.append(threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # this thread only, on Linux
        ready.wait()
        done.wait(30)

    threads = [threading.Thread(target=park, args=(n,)) for n in (0, 15)]
    for thread in threads:
        thread.start()
    ready.wait()
    try:
        normal, already = ids if os.getpriority(os.PRIO_PROCESS, ids[0]) == 0 else ids[::-1]
        yielding = YieldingVcpus(NICE)
        assert yielding.lower([normal, already, None]) == []
        assert yielding.threads == 1
        assert os.getpriority(os.PRIO_PROCESS, normal) == NICE
        assert os.getpriority(os.PRIO_PROCESS, already) == 15
        assert yielding.restore([normal, already]) == []
        assert os.getpriority(os.PRIO_PROCESS, normal) == 0
        assert os.getpriority(os.PRIO_PROCESS, already) == 15
        assert yielding.restore([normal]) == []  # idempotent
        # A thread no longer among the VM's (it ended; its id may be another's now) is forgotten.
        assert yielding.lower([normal]) == [] and os.getpriority(os.PRIO_PROCESS, normal) == NICE
        assert yielding.restore([]) == [] and yielding.threads == 0
        assert os.getpriority(os.PRIO_PROCESS, normal) == NICE
        os.setpriority(os.PRIO_PROCESS, normal, 0)
    finally:
        done.set()
        for thread in threads:
            thread.join()


def test_a_thread_goes_under_sched_idle_wakes_at_the_nice_value_and_a_real_time_one_is_left_alone() -> None:
    assert probe_nice_restore() is None, "precondition: run as root (CAP_SYS_NICE)"
    ready, done = threading.Barrier(3), threading.Event()
    ids: dict[str, int] = {}

    def park(kind: str) -> None:
        ids[kind] = threading.get_native_id()
        if kind == "fifo":
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))  # this thread only
        ready.wait()
        done.wait(30)

    threads = [threading.Thread(target=park, args=(kind,)) for kind in ("normal", "fifo")]
    for thread in threads:
        thread.start()
    ready.wait()
    try:
        normal, fifo = ids["normal"], ids["fifo"]
        yielding = YieldingVcpus(NICE, sched_idle=True)
        assert yielding.lower([normal, fifo]) == []
        assert yielding.went_idle and yielding.threads == 2 and yielding.lowered  # fifo: its nice value only
        assert os.sched_getscheduler(normal) == os.SCHED_IDLE
        assert os.sched_getscheduler(fifo) == os.SCHED_FIFO
        assert yielding.wake([normal, fifo]) == []
        assert os.sched_getscheduler(normal) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, normal) == NICE, "the nice value stays until restore"
        assert yielding.wake([normal]) == []  # idempotent
        assert yielding.restore([normal, fifo]) == [] and not yielding.lowered
        assert os.sched_getscheduler(normal) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, normal) == 0
        assert os.sched_getscheduler(fifo) == os.SCHED_FIFO
        # Restored without a wake first (a migration that ended before its pause).
        assert yielding.lower([normal]) == [] and os.sched_getscheduler(normal) == os.SCHED_IDLE
        assert yielding.restore([normal]) == []
        assert os.sched_getscheduler(normal) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, normal) == 0
    finally:
        done.set()
        for thread in threads:
            thread.join()


def test_a_nice_value_outside_0_to_19_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed are 0 to 19"):
        YieldingVcpus(20)
