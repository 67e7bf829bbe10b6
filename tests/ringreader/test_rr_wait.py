"""rr_wait_dirty through RingWaiter: when the harvester's wait ends and how its checks are paced,
on synthetic rings.

The waits here use 1 us intervals, so a test that reaches its idle time does so in microseconds;
no test reads the clock (the checks made are what the function reports, and the idle time is the
sum of the intervals slept, not a clock's reading)."""

from __future__ import annotations

import threading
import time

import pytest

import ringreader
from ringreader import RingReaderError, RingWaiter
from ringreader._shim import lib

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

MakeRing = Callable[..., npt.NDArray[np.void]]

N = 64
TICK = 1e-6


def test_a_ring_that_holds_the_threshold_ends_the_first_check(make_ring: MakeRing) -> None:
    quiet, busy = make_ring(N), make_ring(N, dirty=range(8))
    waiter = RingWaiter([quiet, busy], N)
    assert waiter.wait(threshold=8, interval_s=TICK, max_interval_s=TICK, idle_s=1000 * TICK) == (1, True)


def test_fewer_than_the_threshold_wait_for_the_idle_time_then_are_due(make_ring: MakeRing) -> None:
    waiter = RingWaiter([make_ring(N, dirty=range(7))], N)
    assert waiter.wait(threshold=8, interval_s=TICK, max_interval_s=TICK, idle_s=25 * TICK) == (25, True)


def test_nothing_waiting_is_not_due(make_ring: MakeRing) -> None:
    waiter = RingWaiter([make_ring(N), make_ring(N)], N)
    assert waiter.wait(threshold=1, interval_s=TICK, max_interval_s=TICK, idle_s=10 * TICK) == (10, False)


def test_entries_are_counted_from_the_fetch_index(make_ring: MakeRing) -> None:
    """Entries behind the fetch index were harvested (RESET): only those from it on wait."""
    ring = make_ring(N, dirty=range(4, 11))
    ring["flags"][:4] = ringreader.DIRTY_GFN_F_RESET
    waiter = RingWaiter([ring], N)
    waiter.fetch_indices[0] = 4
    assert waiter.wait(threshold=8, interval_s=TICK, max_interval_s=TICK, idle_s=3 * TICK) == (3, True)  # 7 waiting
    ring["flags"][11] = ringreader.DIRTY_GFN_F_DIRTY
    assert waiter.wait(threshold=8, interval_s=TICK, max_interval_s=TICK, idle_s=3 * TICK) == (1, True)


def test_the_count_wraps_with_the_u32_index(make_ring: MakeRing) -> None:
    start = 2**32 - 3
    waiter = RingWaiter([make_ring(N, dirty=range(6), start=start)], N)
    waiter.fetch_indices[0] = start
    assert waiter.wait(threshold=6, interval_s=TICK, max_interval_s=TICK, idle_s=5 * TICK) == (1, True)
    assert waiter.wait(threshold=7, interval_s=TICK, max_interval_s=TICK, idle_s=5 * TICK) == (5, True)


def test_a_harvest_by_another_thread_is_seen_by_a_running_wait(make_ring: MakeRing) -> None:
    """The fetch index is read afresh at every check, not once per wait."""
    ring = make_ring(N, dirty=range(20, 30))
    waiter = RingWaiter([ring], N)
    result: list[tuple[int, bool]] = []
    thread = threading.Thread(target=lambda: result.append(waiter.wait(10, 0.001, 0.001, 3600.0)))
    thread.start()
    waiter.fetch_indices[0] = 20
    thread.join(timeout=60)
    assert not thread.is_alive() and result and result[0][1]


def test_stop_ends_a_long_wait_and_every_later_one(make_ring: MakeRing) -> None:
    """Also: the wait holds no GIL. This thread sleeps so that the other is inside the wait, and
    then needs the GIL to call stop(); a wait holding it would never end (an hour of checks)."""
    waiter = RingWaiter([make_ring(N)], N)
    result: list[tuple[int, bool]] = []
    thread = threading.Thread(target=lambda: result.append(waiter.wait(1, 1.0, 4.0, 3600.0)))
    thread.start()
    time.sleep(0.05)
    waiter.stop()
    thread.join(timeout=60)  # the wait is an hour: only the stop ends it in time
    assert not thread.is_alive() and result == [(0, False)]
    assert waiter.stopped
    assert waiter.wait(1, TICK, TICK, 3600.0) == (0, False)


def test_a_released_waiter_waits_on_no_ring(make_ring: MakeRing) -> None:
    ring = make_ring(N, dirty=range(N))
    waiter = RingWaiter([ring], N)
    waiter.release()
    assert waiter.wait(1, TICK, TICK, 10 * TICK) == (0, False)


@pytest.mark.parametrize(
    ("n_entries", "threshold", "interval_s", "max_interval_s", "idle_s", "named"),
    [
        (48, 1, TICK, TICK, TICK, "power of two"),
        (N, 0, TICK, TICK, TICK, "threshold"),
        (N, N + 1, TICK, TICK, TICK, "threshold"),
        (N, 1, 0.0, TICK, TICK, "interval_s"),
        (N, 1, 86401.0, 86401.0, TICK, "interval_s"),
        (N, 1, 2 * TICK, TICK, TICK, "max_interval_s"),
        (N, 1, TICK, 86401.0, TICK, "max_interval_s"),
        (N, 1, TICK, TICK, 0.0, "idle_s"),
    ],
)
def test_bad_arguments_are_named(
    make_ring: MakeRing,
    n_entries: int,
    threshold: int,
    interval_s: float,
    max_interval_s: float,
    idle_s: float,
    named: str,
) -> None:
    with pytest.raises(RingReaderError, match=named):
        RingWaiter([make_ring(n_entries)], n_entries).wait(threshold, interval_s, max_interval_s, idle_s)


def test_quiet_rings_are_checked_at_the_longest_interval(make_ring: MakeRing) -> None:
    """Nothing published since the last check: the next comes max_interval_s later. After the
    first check (at interval_s), 41 ticks of idle time take 1 + 10 checks of 4 ticks, not 41."""
    waiter = RingWaiter([make_ring(N), make_ring(N, dirty=range(3))], N)
    assert waiter.wait(threshold=8, interval_s=TICK, max_interval_s=4 * TICK, idle_s=41 * TICK) == (11, True)


def test_a_gap_of_a_day_does_not_overflow() -> None:
    """left * slept_ns needs more than 64 bits here (2^31 entries times a day in ns)."""
    day_ns = 86400 * 10**9
    assert lib.rr_check_gap_ns(0, 2**20, 2**31, day_ns, 1000, 2**12 * day_ns) == 2**10 * day_ns


@pytest.mark.parametrize(
    ("fill", "passed", "slept_ns", "gap_ns", "why"),
    [
        (0, 0, 1000, 8000, "nothing published: the longest gap"),
        (0, 100, 1000, 8000, "8,192 entries to go at 100 per us: 82 us away, so half that, capped"),
        (4096, 1024, 1000, 2000, "4,096 to go at 1,024 per us: 4 us away, so 2"),
        (8000, 1024, 1000, 1000, "nearly there: never below the interval"),
        (9000, 1024, 1000, 1000, "past the threshold (a harvest is due anyway)"),
        (0, 4, 8000, 8000, "a slow ring looked at slowly"),
    ],
)
def test_the_gap_to_the_next_check_is_half_the_time_to_the_threshold(
    fill: int, passed: int, slept_ns: int, gap_ns: int, why: str
) -> None:
    assert lib.rr_check_gap_ns(fill, passed, 8192, slept_ns, 1000, 8000) == gap_ns, why


def test_a_ring_filling_from_another_thread_ends_the_wait_at_the_threshold(make_ring: MakeRing) -> None:
    """Entries published while the wait runs, as a vCPU would: the wait sees them as they come
    and ends once the threshold is reached, however its checks were paced meanwhile."""
    ring = make_ring(N)
    waiter = RingWaiter([ring], N)
    done = threading.Event()

    def publish() -> None:
        for index in range(N):
            if done.is_set():
                return
            ring["flags"][index] = ringreader.DIRTY_GFN_F_DIRTY
            time.sleep(0.0005)

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        checks, due = waiter.wait(threshold=32, interval_s=0.0002, max_interval_s=0.002, idle_s=60.0)
    finally:
        done.set()
        thread.join()
    assert due and checks >= 1
    assert int((ring["flags"] == ringreader.DIRTY_GFN_F_DIRTY).sum()) >= 32


def test_a_ring_of_another_size_is_refused(make_ring: MakeRing) -> None:
    with pytest.raises(RingReaderError, match="n_entries=64 needs exactly 1024"):
        RingWaiter([make_ring(32)], N)


def test_a_misaligned_ring_is_refused() -> None:
    backing = np.zeros(N * 16 + 8, np.uint8)
    start = 4 if backing.ctypes.data % 8 != 4 else 2
    ring = backing[start : start + N * 16]
    assert ring.ctypes.data % 8
    with pytest.raises(RingReaderError, match="aligned"):
        RingWaiter([ring], N)
