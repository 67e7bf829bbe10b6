"""The downtime window (window.py, realtime.py, cpulatency.py): no garbage collection inside it,
its threads at SCHED_FIFO for it only and as before afterwards, idle CPUs polling while it is
open, and a clean fallback without the right to."""

from __future__ import annotations

import gc
import os
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import MakeDaemon
from migrated.cpulatency import CPU_LATENCY, DEVICE, CpuLatency
from migrated.migration.window import MONITOR, DowntimeWindow
from migrated.realtime import RAISED, window_thread_ids
from daemons import wait_for, wait_migration
from test_migration import assert_runs_here, create, migrate

NO_CAPABILITIES = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")


# Raising a thread to SCHED_FIFO needs CAP_SYS_NICE (root here, and in CI); without it the
# window falls back, which test_without_the_right_to_fifo_the_downtime_runs_as_before_... covers.
needs_fifo = pytest.mark.skipif(os.geteuid() != 0, reason="raising threads to SCHED_FIFO needs CAP_SYS_NICE")


def policy_of(tid: int) -> int:
    return os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK


@pytest.fixture
def parked_thread() -> Iterator[threading.Thread]:
    """A thread named like one of trio's idle workers, parked until the test ends."""
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="Trio thread test")
    thread.start()
    yield thread
    release.set()
    thread.join()


def test_no_collection_runs_inside_the_window_and_the_collector_is_back_after() -> None:
    assert gc.isenabled()
    with DowntimeWindow() as outer:
        assert not gc.isenabled()
        with DowntimeWindow():
            assert not gc.isenabled()
        assert not gc.isenabled(), "an overlapping window that closed first leaves the collector off"
        gc.collect()  # an explicit one still runs, and is counted
    assert gc.isenabled()
    assert outer.gc_collections >= 1 and outer.gc_ms > 0
    assert MONITOR.collections >= 1


@needs_fifo
def test_the_windows_threads_run_at_fifo_for_the_window_only(parked_thread: threading.Thread) -> None:
    thread = parked_thread
    assert thread.native_id is not None
    me = threading.get_native_id()
    assert policy_of(thread.native_id) == os.SCHED_OTHER and policy_of(me) == os.SCHED_OTHER
    assert {me, thread.native_id} <= window_thread_ids()
    started_inside: list[int] = []
    with DowntimeWindow(realtime=True) as window:
        assert window.realtime_error is None
        assert window.raised_threads >= 2
        assert policy_of(thread.native_id) == os.SCHED_FIFO and policy_of(me) == os.SCHED_FIFO
        # A thread a raised thread starts is a normal one (SCHED_RESET_ON_FORK): a vCPU or a
        # worker started in the window never keeps the window's policy.
        child = threading.Thread(target=lambda: started_inside.append(policy_of(threading.get_native_id())))
        child.start()
        child.join()
        with DowntimeWindow(realtime=True):
            pass
        assert policy_of(me) == os.SCHED_FIFO, "an overlapping window that closed first lowers nothing"
    assert started_inside == [os.SCHED_OTHER]
    assert policy_of(thread.native_id) == os.SCHED_OTHER and policy_of(me) == os.SCHED_OTHER
    assert len(RAISED) == 0


@needs_fifo
def test_the_event_loop_raised_before_the_window_stays_raised_until_it_closes(parked_thread: threading.Thread) -> None:
    """A target's event loop (`raise_event_loop`): alone at FIFO before the window, the other
    window threads only once it opens, and everything back when it closes, opened or not."""
    thread = parked_thread
    assert thread.native_id is not None
    me = threading.get_native_id()
    window = DowntimeWindow(realtime=True)
    window.raise_event_loop()
    assert policy_of(me) == os.SCHED_FIFO and policy_of(thread.native_id) == os.SCHED_OTHER
    window.open()
    assert policy_of(thread.native_id) == os.SCHED_FIFO
    window.close()
    assert policy_of(me) == os.SCHED_OTHER and policy_of(thread.native_id) == os.SCHED_OTHER
    assert len(RAISED) == 0
    never_opened = DowntimeWindow(realtime=True)
    never_opened.raise_event_loop()
    assert policy_of(me) == os.SCHED_FIFO
    never_opened.close()
    assert policy_of(me) == os.SCHED_OTHER and len(RAISED) == 0
    unraised = DowntimeWindow(realtime=False)
    unraised.raise_event_loop()
    assert policy_of(me) == os.SCHED_OTHER, "realtime off: nothing raised"


@needs_fifo
def test_the_event_loop_lowered_early_is_raised_again_by_its_window() -> None:
    """A source's loop, raised for its setup and lowered for the bulk copy (`lower_event_loop`,
    idempotent), is at FIFO again once the downtime's window opens, and back after it."""
    me = threading.get_native_id()
    window = DowntimeWindow(realtime=True)
    window.raise_event_loop()
    assert policy_of(me) == os.SCHED_FIFO
    window.lower_event_loop()
    window.lower_event_loop()
    assert policy_of(me) == os.SCHED_OTHER and len(RAISED) == 0
    window.open()
    assert policy_of(me) == os.SCHED_FIFO
    window.close()
    assert policy_of(me) == os.SCHED_OTHER and len(RAISED) == 0


@needs_fifo
@pytest.mark.kvm
def test_a_sources_event_loop_is_raised_for_its_setup_and_lowered_after(make_daemon: MakeDaemon) -> None:
    """The source's event loop (its main thread) is at FIFO while the setup runs (held there by
    the cutover-holds fault, before the description goes out), and at its own policy once the
    migration ended: completed, or failed in its setup (a target that refuses the description:
    it has a VM of that name)."""
    a, b = make_daemon("a", faults="cutover-holds"), make_daemon("b")
    loop = a.process.pid  # trio runs on the daemon's main thread
    assert policy_of(loop) == os.SCHED_OTHER
    create(a, rate=1)
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: '"point": "setup"' in a.log(), what="the source to hold in its setup")
    assert policy_of(loop) == os.SCHED_FIFO
    assert wait_migration(a, "vm1")["state"] == "completed"
    # "completed" is said inside the downtime's window, which closes as the migration's task ends.
    wait_for(lambda: policy_of(loop) == os.SCHED_OTHER, what="the source's loop back at its policy")
    c, d = make_daemon("c"), make_daemon("d")
    create(c, rate=1)
    create(d, rate=1)
    stats = migrate(c, d)
    assert stats["state"] == "failed" and "already exists" in stats["error"], stats
    wait_for(lambda: policy_of(c.process.pid) == os.SCHED_OTHER, what="the failed source's loop lowered")
    wait_for(lambda: policy_of(d.process.pid) == os.SCHED_OTHER, what="the refusing target's loop lowered")


@pytest.mark.kvm
def test_without_the_right_to_fifo_the_downtime_runs_as_before_and_startup_says_so(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a", downtime_limit_ms=300)
    b = make_daemon("b", downtime_limit_ms=300)
    # `a` again, without any capability (and the default RLIMIT_RTPRIO of 0).
    a.stop()
    a.wrapper = ("prlimit", "--rtprio=0", *NO_CAPABILITIES)
    a.start()
    (warning,) = a.events("harvester_realtime_unavailable")
    assert "migration.downtime_realtime" in str(warning["cost"]), warning
    create(a, rate=0.0, memory_mib=128, working_set_mib=16)
    done = migrate(a, b)
    assert done["state"] == "completed", done
    assert done["downtime_realtime_threads"] == 0, "not allowed: nothing raised, and no failure"
    assert done["downtime_gc_ms"] == 0.0
    assert_runs_here(b, "vm1")
    back = migrate(b, a)
    assert back["state"] == "completed", back
    assert back["downtime_realtime_threads"] > 0, "b may: its threads ran at FIFO in the downtime"
    assert_runs_here(a, "vm1")


@pytest.mark.kvm
def test_no_module_is_first_imported_inside_a_downtime_window(make_daemon: MakeDaemon) -> None:
    """A lazy import is a cold path in the downtime of the first migration that reaches it. The
    way back starts from the daemon the VM arrived at, which had never saved a VM's state nor
    harvested for a migration (numpy's first `np.unique` imported `numpy.ma` there: 8-9 ms)."""
    a = make_daemon("a", downtime_limit_ms=300)
    b = make_daemon("b", downtime_limit_ms=300)
    create(a, rate=0.0, memory_mib=128, vcpus=1, working_set_mib=16)
    for source, target in ((a, b), (b, a)):
        done = migrate(source, target)
        assert done["state"] == "completed", done
    assert_runs_here(a, "vm1")
    for daemon in (a, b):
        assert daemon.events("migration_completed") or daemon.events("incoming_vm_running")
        imports = [(e["component"], e["modules"]) for e in daemon.events("downtime_window_imports")]
        assert imports == [], f"{daemon.name} imported inside a downtime window"


def cpu_latency_target_us() -> int:
    """What the kernel's CPU latency constraint is now (reading the device adds no constraint)."""
    fd = os.open(DEVICE, os.O_RDONLY)
    try:
        return int(struct.unpack("=i", os.read(fd, 4))[0])
    finally:
        os.close(fd)


# Root only, as the device is; as root (here, and in CI) a missing or unwritable device fails.
needs_pm_qos = pytest.mark.skipif(os.geteuid() != 0, reason=f"{DEVICE} is writable by root only")


def unconstrained_within(seconds: float = 10.0) -> bool:
    """Whether no process holds a 0 us request at some moment within `seconds`: another daemon's
    downtime window (another test run on this host) holds one for milliseconds, ours until
    released."""
    deadline = time.monotonic() + seconds
    while cpu_latency_target_us() == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@needs_pm_qos
def test_idle_cpus_poll_while_a_window_is_open_and_not_after() -> None:
    """A PM QoS request of 0 us while any window that asks for it is open (counted across
    overlapping windows), and none once the last closed; a window that does not ask holds none."""
    assert CPU_LATENCY.open() is None
    assert unconstrained_within(), "a 0 us request held by someone else for 10 s: this test cannot tell"
    first, second = DowntimeWindow(idle_polling=True), DowntimeWindow(idle_polling=True)
    with first:
        assert cpu_latency_target_us() == 0
        second.open()
        second.open()  # idempotent: one hold
        assert CPU_LATENCY.held
    assert CPU_LATENCY.held and cpu_latency_target_us() == 0, "the second window is still open"
    second.close()
    assert not CPU_LATENCY.held
    assert unconstrained_within(), "the request outlived the last window"
    with DowntimeWindow(idle_polling=False):
        assert not CPU_LATENCY.held
        assert unconstrained_within()


def test_without_the_device_a_window_holds_nothing_and_says_why(tmp_path: os.PathLike[str]) -> None:
    latency = CpuLatency()
    error = latency.open(os.path.join(tmp_path, "no-such-device"))
    assert error is not None and "No such file or directory" in error
    assert latency.error == error
    latency.hold()
    assert not latency.held
    latency.release()
    latency.release()  # more releases than holds: ignored
    assert not latency.held
