"""rr_harvest through the wrapper: order, wraparound, limits, and the flags it leaves behind."""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

import ringreader
from ringreader import DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET, harvest

U32 = 2**32

Outs = Callable[[int], tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64]]]
MakeRing = Callable[..., npt.NDArray[np.void]]


def test_partial_ring_harvests_dirty_prefix(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(16, dirty=range(5))
    out_slot, out_offset = outs(16)
    count, index = harvest(ring, 16, 0, out_slot, out_offset)
    assert (count, index) == (5, 5)
    assert out_slot[:5].tolist() == [0, 1, 2, 3, 4]
    assert out_offset[:5].tolist() == [1000, 1001, 1002, 1003, 1004]
    assert ring["flags"].tolist() == [DIRTY_GFN_F_RESET] * 5 + [0] * 11


def test_stops_at_first_clean_entry(make_ring: MakeRing, outs: Outs) -> None:
    # api.rst: "the userspace program cannot skip one dirty GFN to collect the one next to it"
    ring = make_ring(8, dirty=[0, 1, 3, 4])
    count, index = harvest(ring, 8, 0, *outs(8))
    assert (count, index) == (2, 2)
    assert ring["flags"].tolist() == [2, 2, 0, 1, 1, 0, 0, 0]


def test_flags_become_reset_exactly_for_harvested_entries(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(32, dirty=list(range(10)) + [12, 20], start=7)
    before = ring["flags"].copy()
    count, _ = harvest(ring, 32, 7, *outs(32))
    assert count == 10
    harvested = [(7 + k) % 32 for k in range(10)]
    expected = before.copy()
    expected[harvested] = DIRTY_GFN_F_RESET
    assert ring["flags"].tolist() == expected.tolist()
    # slot/offset are never written by the harvester
    assert ring["slot"].tolist() == list(range(32))


def test_full_ring_then_nothing(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(64, dirty=range(64), start=10)
    out_slot, out_offset = outs(64)
    count, index = harvest(ring, 64, 10, out_slot, out_offset)
    assert (count, index) == (64, 74)
    assert out_slot.tolist() == [(10 + k) % 64 for k in range(64)]
    assert (ring["flags"] == DIRTY_GFN_F_RESET).all()
    # RESET entries (1Xb) are not dirty: a second pass finds nothing and keeps the index.
    assert harvest(ring, 64, index, out_slot, out_offset) == (0, 74)


def test_never_more_than_one_lap(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(8, dirty=range(8))
    count, index = harvest(ring, 8, 3, *outs(100))
    assert (count, index) == (8, 11)


def test_u32_fetch_index_wraps(make_ring: MakeRing, outs: Outs) -> None:
    start = U32 - 3
    ring = make_ring(8, dirty=range(6), start=start)
    out_slot, out_offset = outs(8)
    count, index = harvest(ring, 8, start, out_slot, out_offset)
    assert count == 6
    assert index == 3  # (2**32 - 3 + 6) mod 2**32
    assert out_slot[:6].tolist() == [(start + k) % 8 for k in range(6)]


def test_capacity_limits_and_resume_continues(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(16, dirty=range(7), start=U32 - 2)
    out_slot, out_offset = outs(16)
    index = U32 - 2
    got: list[int] = []
    for expected in (3, 3, 1, 0):
        count, index = harvest(ring, 16, index, out_slot, out_offset, capacity=3)
        assert count == expected
        got += out_offset[:count].tolist()
    assert index == 5
    assert got == [1000 + (U32 - 2 + k) % 16 for k in range(7)]


def test_capacity_defaults_to_shorter_output(make_ring: MakeRing) -> None:
    ring = make_ring(16, dirty=range(16))
    count, _ = harvest(ring, 16, 0, np.zeros(4, np.uint32), np.zeros(9, np.uint64))
    assert count == 4
    assert (ring["flags"][4:] == DIRTY_GFN_F_DIRTY).all()


def test_capacity_zero_harvests_nothing(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(4, dirty=range(4))
    assert harvest(ring, 4, 0, *outs(4), capacity=0) == (0, 0)
    assert (ring["flags"] == DIRTY_GFN_F_DIRTY).all()


def test_one_entry_ring(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(1, dirty=[0])
    assert harvest(ring, 1, U32 - 1, *outs(1)) == (1, 0)


def test_mmap_backed_ring() -> None:
    n = 256
    with mmap.mmap(-1, n * ringreader.DIRTY_GFN_SIZE) as mm:
        view = np.frombuffer(mm, dtype=ringreader.DIRTY_GFN_DTYPE)
        view["slot"] = 1
        view["offset"] = np.arange(n)
        view["flags"][:100] = DIRTY_GFN_F_DIRTY
        out_slot, out_offset = np.zeros(n, np.uint32), np.zeros(n, np.uint64)
        assert harvest(mm, n, 0, out_slot, out_offset) == (100, 100)
        assert out_offset[:100].tolist() == list(range(100))
        assert (view["flags"][:100] == DIRTY_GFN_F_RESET).all()
        del view  # the wrapper itself must hold no export, or close() below would fail
    assert mm.closed


def test_bytearray_ring(make_ring: MakeRing, outs: Outs) -> None:
    ring = bytearray(make_ring(4, dirty=[0, 1]).tobytes())
    assert harvest(ring, 4, 0, *outs(4)) == (2, 2)


def test_numpy_int_arguments_accepted(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(8, dirty=range(2))
    assert harvest(ring, np.uint32(8), np.uint32(0), *outs(8)) == (2, 2)
