"""Deduplication of harvested (slot, offset) pairs at a cost that follows the dirty pages.

The same page comes back after every KVM_RESET_DIRTY_RINGS (DESIGN.md R3). A per-slot "seen"
bitmap answers "already queued?" in O(1), and because exactly the bits that were set get cleared
again, no call ever scans or zeroes a whole bitmap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _args
from ._shim import RingReaderError, check, ffi, lib

MAX_SLOTS = 1 << 20
"""Bound on slot ids. KVM's are (as_id << 16) | id with id < 32768 and, today, at most two address
spaces (x86 SMM), so real ids stay below 2**17; the bound stops a typo from allocating gigabytes."""

MAX_SLOT_PAGES = 1 << 52
"""A memslot cannot exceed the 64-bit guest physical space in 4 KiB pages."""


class DirtyDedup:
    """Per-slot "seen" bitmaps for deduplicating harvested entries.

    slot_npages maps slot id -> page count (a sequence means ids 0, 1, 2, ...). Bitmaps are
    np.zeros, so untouched parts of a huge slot stay unbacked zero pages. Not thread-safe: the C
    calls run without the GIL, so give each instance a single owner.
    """

    def __init__(self, slot_npages: Mapping[int, int] | Sequence[int]) -> None:
        items = slot_npages.items() if isinstance(slot_npages, Mapping) else enumerate(slot_npages)
        sizes: dict[int, int] = {}
        for slot, npages in items:
            key = _args.as_int("slot id", slot, 0, MAX_SLOTS - 1)
            sizes[key] = _args.as_int(f"page count of slot {key}", npages, 0, MAX_SLOT_PAGES)
        self._sizes = sizes
        n_slots = max(sizes, default=-1) + 1
        self._npages = np.zeros(n_slots, dtype=np.uint64)
        self._bitmaps: dict[int, npt.NDArray[np.uint64]] = {}
        # Slots that are absent or empty keep a NULL pointer; npages 0 makes C reject any offset
        # there before it could dereference it.
        self._c_bitmaps = ffi.new("uint64_t *[]", max(n_slots, 1))
        self._keepalive: list[Any] = []  # cdata holding the numpy buffers' exports
        for slot, npages in sizes.items():
            self._npages[slot] = npages
            if npages:
                bitmap = np.zeros((npages + 63) // 64, dtype=np.uint64)
                c_bitmap = ffi.from_buffer("uint64_t[]", bitmap, require_writable=True)
                self._bitmaps[slot] = bitmap
                self._keepalive.append(c_bitmap)
                self._c_bitmaps[slot] = c_bitmap
        self._c_npages = ffi.from_buffer("uint64_t[]", self._npages)
        self._n_slots = n_slots

    @property
    def slot_npages(self) -> dict[int, int]:
        return dict(self._sizes)

    def unique(
        self, slot: npt.NDArray[np.uint32], offset: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64]]:
        """First occurrence of every (slot, offset) pair, in input order.

        Raises RingReaderError, leaving every bitmap untouched, if any pair lies outside the
        slots this instance tracks. On return all bitmaps are zero again.
        """
        _args.array("slot", slot, np.uint32, writable=False)
        _args.array("offset", offset, np.uint64, writable=False)
        if len(slot) != len(offset):
            raise RingReaderError(f"slot and offset must have the same length, got {len(slot)} and {len(offset)}")
        n = len(slot)
        out_slot = np.empty(n, dtype=np.uint32)
        out_offset = np.empty(n, dtype=np.uint64)
        c_out_slot = ffi.from_buffer("uint32_t[]", out_slot)
        c_out_offset = ffi.from_buffer("uint64_t[]", out_offset)
        rc = lib.rr_dedup(
            ffi.from_buffer("uint32_t[]", slot),
            ffi.from_buffer("uint64_t[]", offset),
            n,
            self._c_bitmaps,
            self._c_npages,
            self._n_slots,
            c_out_slot,
            c_out_offset,
        )
        kept = check(rc, "rr_dedup", lambda: self._describe_out_of_range(slot, offset))
        # rr_dedup left the kept bits set; clearing exactly those restores all-zero bitmaps.
        lib.rr_clear_bits(self._c_bitmaps, c_out_slot, c_out_offset, kept)
        return out_slot[:kept], out_offset[:kept]

    def bitmaps_are_clear(self) -> bool:
        """True if every bitmap is zero. O(guest size): for tests and assertions only."""
        return not any(bitmap.any() for bitmap in self._bitmaps.values())

    def _describe_out_of_range(self, slot: npt.NDArray[np.uint32], offset: npt.NDArray[np.uint64]) -> str:
        known = slot < self._n_slots
        limit = np.zeros(len(slot), dtype=np.uint64)
        limit[known] = self._npages[slot[known]]
        bad = np.flatnonzero(offset >= limit)  # unknown slots have limit 0, so they land here too
        if not len(bad):
            return "no offending entry found"
        i = int(bad[0])
        s, o = int(slot[i]), int(offset[i])
        if s not in self._sizes:
            return f"entry {i} names slot {s}, tracked slots are {sorted(self._sizes)}"
        return f"entry {i}: offset {o} is outside slot {s}, which has {self._sizes[s]} pages"
