"""Typed entry points for the ring harvest and the bitmap-mode reference path."""

from __future__ import annotations

from typing import SupportsIndex

import numpy as np
import numpy.typing as npt

from . import _args
from ._constants import DIRTY_GFN_SIZE
from ._shim import check, check_ring_aligned, ffi, lib

DIRTY_GFN_DTYPE = np.dtype([("flags", np.uint32), ("slot", np.uint32), ("offset", np.uint64)])
"""numpy view of struct kvm_dirty_gfn, e.g. np.frombuffer(ring_mmap, DIRTY_GFN_DTYPE)."""
assert DIRTY_GFN_DTYPE.itemsize == DIRTY_GFN_SIZE


def harvest(
    ring: _args.RingBuffer,
    n_entries: SupportsIndex,
    fetch_index: SupportsIndex,
    out_slot: npt.NDArray[np.uint32],
    out_offset: npt.NDArray[np.uint64],
    capacity: SupportsIndex | None = None,
) -> tuple[int, int]:
    """Harvest dirty entries from ring in order, starting at fetch_index.

    Writes at most min(capacity, n_entries) (slot, offset) pairs to the front of out_slot and
    out_offset, marks each harvested entry RESET, and returns (count, new fetch_index). capacity
    defaults to the shorter output array. Call KVM_RESET_DIRTY_RINGS afterwards and before
    reading the pages (DESIGN.md R3).
    """
    n = _args.n_entries(n_entries)
    index = _args.fetch_index(fetch_index)
    _args.array("out_slot", out_slot, np.uint32, writable=True)
    _args.array("out_offset", out_offset, np.uint64, writable=True)
    room = min(len(out_slot), len(out_offset))
    limit = room if capacity is None else _args.as_int("capacity", capacity, 0, room)
    _args.ring_buffer(ring, n, DIRTY_GFN_SIZE)

    c_index = ffi.new("uint32_t *", index)
    with ffi.from_buffer("struct rr_dirty_gfn[]", ring, require_writable=True) as c_ring:
        check_ring_aligned(c_ring)
        rc = lib.rr_harvest(
            c_ring,
            n,
            c_index,
            ffi.from_buffer("uint32_t[]", out_slot),
            ffi.from_buffer("uint64_t[]", out_offset),
            limit,
        )
    return check(rc, "rr_harvest"), int(c_index[0])


def bitmap_to_pages(
    bitmap: npt.NDArray[np.uint64], out: npt.NDArray[np.uint64] | None = None
) -> npt.NDArray[np.uint64]:
    """Page indices of the set bits of a KVM_GET_DIRTY_LOG bitmap, ascending.

    bitmap holds u64 words, bit i of word w being page w * 64 + i. With out=None the result is
    freshly allocated at its exact size; otherwise it is a prefix view of out.
    """
    _args.array("bitmap", bitmap, np.uint64, writable=False)
    c_bitmap = ffi.from_buffer("uint64_t[]", bitmap)
    pages: npt.NDArray[np.uint64]
    if out is None:
        # Count first: sizing for the worst case would be 64 times the bitmap.
        pages = np.empty(check(lib.rr_bitmap_count(c_bitmap, len(bitmap)), "rr_bitmap_count"), dtype=np.uint64)
    else:
        _args.array("out", out, np.uint64, writable=True)
        pages = out
    rc = lib.rr_bitmap_to_pages(c_bitmap, len(bitmap), ffi.from_buffer("uint64_t[]", pages), len(pages))
    count = check(rc, "rr_bitmap_to_pages", lambda: f"out holds {len(pages)} pages, the bitmap has more set bits")
    return pages[:count]
