"""rr_wait_dirty through RingWaiter: when the harvester's wait ends, on synthetic rings.

The waits here use a 1 us interval, so a test that reaches max_checks does so in microseconds;
no test reads the clock (the checks made are what the function reports)."""

from __future__ import annotations

import threading
import time

import pytest

import ringreader
from ringreader import RingReaderError, RingWaiter

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

MakeRing = Callable[..., npt.NDArray[np.void]]

N = 64
TICK = 1e-6


def test_a_ring_that_holds_the_threshold_ends_the_first_check(make_ring: MakeRing) -> None:
    quiet, busy = make_ring(N), make_ring(N, dirty=range(8))
    waiter = RingWaiter([quiet, busy], N)
    assert waiter.wait(threshold=8, interval_s=TICK, max_checks=1000) == (1, True)


def test_fewer_than_the_threshold_wait_for_max_checks_then_are_due(make_ring: MakeRing) -> None:
    waiter = RingWaiter([make_ring(N, dirty=range(7))], N)
    assert waiter.wait(threshold=8, interval_s=TICK, max_checks=25) == (25, True)


def test_nothing_waiting_is_not_due(make_ring: MakeRing) -> None:
    waiter = RingWaiter([make_ring(N), make_ring(N)], N)
    assert waiter.wait(threshold=1, interval_s=TICK, max_checks=10) == (10, False)


def test_entries_are_counted_from_the_fetch_index(make_ring: MakeRing) -> None:
    """Entries behind the fetch index were harvested (RESET): only those from it on wait."""
    ring = make_ring(N, dirty=range(4, 11))
    ring["flags"][:4] = ringreader.DIRTY_GFN_F_RESET
    waiter = RingWaiter([ring], N)
    waiter.fetch_indices[0] = 4
    assert waiter.wait(threshold=8, interval_s=TICK, max_checks=3) == (3, True)  # 7 waiting
    ring["flags"][11] = ringreader.DIRTY_GFN_F_DIRTY
    assert waiter.wait(threshold=8, interval_s=TICK, max_checks=3) == (1, True)


def test_the_count_wraps_with_the_u32_index(make_ring: MakeRing) -> None:
    start = 2**32 - 3
    waiter = RingWaiter([make_ring(N, dirty=range(6), start=start)], N)
    waiter.fetch_indices[0] = start
    assert waiter.wait(threshold=6, interval_s=TICK, max_checks=5) == (1, True)
    assert waiter.wait(threshold=7, interval_s=TICK, max_checks=5) == (5, True)


def test_a_harvest_by_another_thread_is_seen_by_a_running_wait(make_ring: MakeRing) -> None:
    """The fetch index is read afresh at every check, not once per wait."""
    ring = make_ring(N, dirty=range(20, 30))
    waiter = RingWaiter([ring], N)
    result: list[tuple[int, bool]] = []
    thread = threading.Thread(target=lambda: result.append(waiter.wait(10, 0.001, 10**9)))
    thread.start()
    waiter.fetch_indices[0] = 20
    thread.join(timeout=60)
    assert not thread.is_alive() and result and result[0][1]


def test_stop_ends_a_long_wait_and_every_later_one(make_ring: MakeRing) -> None:
    """Also: the wait holds no GIL. This thread sleeps so that the other is inside the wait, and
    then needs the GIL to call stop(); a wait holding it would never end (an hour per check)."""
    waiter = RingWaiter([make_ring(N)], N)
    result: list[tuple[int, bool]] = []
    thread = threading.Thread(target=lambda: result.append(waiter.wait(1, 3600.0, 10)))
    thread.start()
    time.sleep(0.05)
    waiter.stop()
    thread.join(timeout=60)  # the interval is an hour: only the stop ends it in time
    assert not thread.is_alive() and result == [(0, False)]
    assert waiter.stopped
    assert waiter.wait(1, TICK, 10**9) == (0, False)


def test_a_released_waiter_waits_on_no_ring(make_ring: MakeRing) -> None:
    ring = make_ring(N, dirty=range(N))
    waiter = RingWaiter([ring], N)
    waiter.release()
    assert waiter.wait(1, TICK, 10) == (0, False)


@pytest.mark.parametrize(
    ("n_entries", "threshold", "interval_s", "max_checks", "named"),
    [
        (48, 1, TICK, 1, "power of two"),
        (N, 0, TICK, 1, "threshold"),
        (N, N + 1, TICK, 1, "threshold"),
        (N, 1, 0.0, 1, "interval_s"),
        (N, 1, TICK, 0, "max_checks"),
    ],
)
def test_bad_arguments_are_named(
    make_ring: MakeRing, n_entries: int, threshold: int, interval_s: float, max_checks: int, named: str
) -> None:
    with pytest.raises(RingReaderError, match=named):
        RingWaiter([make_ring(n_entries)], n_entries).wait(threshold, interval_s, max_checks)


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
