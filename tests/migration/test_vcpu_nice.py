"""A migrating guest's vCPU threads yield the CPU to the migration (`migration.vcpu_nice`,
migrated/vcpupriority.py): real daemons and vCPU threads, their nice values read from /proc.

Python 3.11 does not name OS threads, so the vCPU threads are told apart by their nice value: no
other thread of a daemon changes its own. The precondition (none at the value before the
migration) is asserted, not assumed."""

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


@pytest.mark.kvm
def test_the_vcpus_yield_while_migrating_and_get_their_priority_back_when_cancelled(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a", downtime_limit_ms=1, max_rounds=10000, timeout_s=600, vcpu_nice=NICE)
    b = make_daemon("b")
    create(a, rate="max", working_set_mib=64, vcpus=2)
    assert at_nice(a) == 0, f"precondition: a thread of a is at nice {NICE} already: {thread_nices(a)}"
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: at_nice(a) == 2, what=f"the 2 vCPU threads at nice {NICE}")
    wait_for(lambda: a.call("migration.status", name="vm1")["round"] >= 1, what="a dirty round")
    assert a.call("migration.status", name="vm1")["vcpu_nice"] == NICE
    a.call("migration.cancel", name="vm1")
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "cancelled", stats
    # Published last, after the resume: the threads had their value back before the guest ran.
    assert at_nice(a) == 0, thread_nices(a)
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
def test_at_zero_the_vcpus_are_left_alone(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", vcpu_nice=0), make_daemon("b")
    create(a, rate=8, working_set_mib=16, vcpus=2)
    a.call("migrate", name="vm1", to=b.address)
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    assert stats["vcpu_nice"] == 0


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


def test_a_nice_value_outside_0_to_19_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed are 0 to 19"):
        YieldingVcpus(20)
