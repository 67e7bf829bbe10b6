"""Every argument is checked before C sees it; errors name the problem and what is allowed."""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

import ringreader
from ringreader import RingReaderError, harvest

Outs = Callable[[int], tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64]]]
MakeRing = Callable[..., npt.NDArray[np.void]]


def test_error_is_a_value_error() -> None:
    assert issubclass(RingReaderError, ValueError)


@pytest.mark.parametrize("n", [0, 3, 6, 12, 2**31 + 1, 2**32])
def test_n_entries_not_power_of_two(n: int, outs: Outs) -> None:
    with pytest.raises(RingReaderError, match="n_entries"):
        harvest(bytearray(16 * 8), n, 0, *outs(8))


def test_n_entries_message_says_power_of_two(outs: Outs) -> None:
    with pytest.raises(RingReaderError, match="power of two.*6"):
        harvest(bytearray(16 * 6), 6, 0, *outs(8))


@pytest.mark.parametrize("index", [-1, 2**32, 1.0, "0", True])
def test_fetch_index_must_be_u32(index: object, make_ring: MakeRing, outs: Outs) -> None:
    with pytest.raises(RingReaderError, match="fetch_index"):
        harvest(make_ring(8), 8, index, *outs(8))  # type: ignore[arg-type]


@pytest.mark.parametrize("nbytes", [0, 16 * 8 - 1, 16 * 7, 16 * 9])
def test_ring_size_must_match_n_entries(nbytes: int, outs: Outs) -> None:
    with pytest.raises(RingReaderError, match=f"ring is {nbytes} bytes.*n_entries=8"):
        harvest(bytearray(nbytes), 8, 0, *outs(8))


def test_read_only_numpy_ring(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(8, dirty=[0])
    ring.flags.writeable = False
    with pytest.raises(RingReaderError, match="writable"):
        harvest(ring, 8, 0, *outs(8))


def test_bytes_ring_is_read_only(outs: Outs) -> None:
    with pytest.raises(RingReaderError, match="writable"):
        harvest(bytes(16 * 8), 8, 0, *outs(8))  # type: ignore[arg-type]


def test_read_only_mmap(outs: Outs) -> None:
    with mmap.mmap(-1, 16 * 8, access=mmap.ACCESS_READ) as mm:
        with pytest.raises(RingReaderError, match="writable"):
            harvest(mm, 8, 0, *outs(8))


def test_closed_mmap(outs: Outs) -> None:
    mm = mmap.mmap(-1, 16 * 8)
    mm.close()
    with pytest.raises(RingReaderError, match="ring must be a writable buffer"):
        harvest(mm, 8, 0, *outs(8))


def test_not_a_buffer(outs: Outs) -> None:
    with pytest.raises(RingReaderError, match="got list"):
        harvest([0] * 32, 8, 0, *outs(8))  # type: ignore[arg-type]


def test_non_contiguous_ring(make_ring: MakeRing, outs: Outs) -> None:
    ring = make_ring(16)[::2]
    with pytest.raises(RingReaderError, match="C-contiguous"):
        harvest(ring, 8, 0, *outs(8))


def test_misaligned_ring(outs: Outs) -> None:
    backing = np.zeros(16 * 8 + 1, dtype=np.uint8)
    if backing.ctypes.data % 8 == 7:
        backing = np.zeros(16 * 8 + 2, dtype=np.uint8)[1:]
    ring = backing[1:]
    assert ring.ctypes.data % 8
    with pytest.raises(RingReaderError, match="aligned"):
        harvest(ring, 8, 0, *outs(8))


@pytest.mark.parametrize(
    ("out_slot", "out_offset", "match"),
    [
        (np.zeros(8, np.uint64), np.zeros(8, np.uint64), "out_slot must have dtype uint32"),
        (np.zeros(8, np.int32), np.zeros(8, np.uint64), "out_slot must have dtype uint32"),
        (np.zeros(8, np.uint32), np.zeros(8, np.uint32), "out_offset must have dtype uint64"),
        (np.zeros(8, np.uint32), np.zeros(8, ">u8"), "out_offset must have dtype uint64"),
        (np.zeros(16, np.uint32)[::2], np.zeros(8, np.uint64), "out_slot must be C-contiguous"),
        (np.zeros((2, 4), np.uint32), np.zeros(8, np.uint64), "out_slot must be 1-D"),
        ([0] * 8, np.zeros(8, np.uint64), "out_slot must be a numpy array of uint32, got list"),
    ],
)
def test_output_arrays_checked(out_slot: object, out_offset: object, match: str, make_ring: MakeRing) -> None:
    ring = make_ring(8, dirty=range(8))
    with pytest.raises(RingReaderError, match=match):
        harvest(ring, 8, 0, out_slot, out_offset)  # type: ignore[arg-type]
    assert (ring["flags"] == ringreader.DIRTY_GFN_F_DIRTY).all()


def test_read_only_output(make_ring: MakeRing) -> None:
    out_slot = np.zeros(8, np.uint32)
    out_slot.flags.writeable = False
    with pytest.raises(RingReaderError, match="out_slot must be writable"):
        harvest(make_ring(8), 8, 0, out_slot, np.zeros(8, np.uint64))


@pytest.mark.parametrize("capacity", [-1, 9])
def test_capacity_beyond_outputs(capacity: int, make_ring: MakeRing, outs: Outs) -> None:
    with pytest.raises(RingReaderError, match=r"capacity must be in \[0, 8\]"):
        harvest(make_ring(8), 8, 0, *outs(8), capacity=capacity)


def test_c_rejects_bad_n_entries_too() -> None:
    # Defence in depth below the wrapper, mapped through the one error table.
    from ringreader._shim import check, ffi, lib

    idx = ffi.new("uint32_t *", 0)
    rc = lib.rr_harvest(ffi.NULL, 6, idx, ffi.NULL, ffi.NULL, 6)
    with pytest.raises(RingReaderError, match="rr_harvest failed with EINVAL"):
        check(rc, "rr_harvest")
