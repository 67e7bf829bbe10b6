"""Pure-Python versions of the shim's loops: the test oracle and the benchmark's reference.

No numpy and no C, on purpose: these must be obviously right, not fast. Python cannot express
acquire/release, so harvest() here is for rings nobody else writes concurrently (tests, benches).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ._constants import (
    DIRTY_GFN_F_DIRTY,
    DIRTY_GFN_F_RESET,
    DIRTY_GFN_SIZE,
    U32_MASK,
    is_power_of_two,
)

_U32_PER_GFN = DIRTY_GFN_SIZE // 4
_U64_PER_GFN = DIRTY_GFN_SIZE // 8


def harvest(
    ring: object, n_entries: int, fetch_index: int, capacity: int | None = None
) -> tuple[list[int], list[int], int]:
    """Same semantics as ringreader.harvest; returns (slots, offsets, new fetch_index)."""
    if not is_power_of_two(n_entries) or n_entries > 1 << 31:
        raise ValueError(f"n_entries must be a power of two, got {n_entries}")
    if not 0 <= fetch_index <= U32_MASK:
        raise ValueError(f"fetch_index must be a u32, got {fetch_index}")
    raw = memoryview(ring).cast("B")  # type: ignore[arg-type]
    if raw.nbytes != n_entries * DIRTY_GFN_SIZE:
        raise ValueError(f"ring is {raw.nbytes} bytes, expected {n_entries * DIRTY_GFN_SIZE}")
    # flags and slot are u32 words 0 and 1 of an entry, offset is u64 word 1.
    u32 = raw.cast("I")
    u64 = raw.cast("Q")
    limit = n_entries if capacity is None else min(capacity, n_entries)
    mask = n_entries - 1
    slots: list[int] = []
    offsets: list[int] = []
    index = fetch_index
    while len(slots) < limit:
        entry = index & mask
        flags_at = entry * _U32_PER_GFN
        if not u32[flags_at] & DIRTY_GFN_F_DIRTY:
            break
        slots.append(u32[flags_at + 1])
        offsets.append(u64[entry * _U64_PER_GFN + 1])
        u32[flags_at] = DIRTY_GFN_F_RESET
        index = (index + 1) & U32_MASK
    return slots, offsets, index


def dedup(
    slots: Iterable[int], offsets: Iterable[int], slot_npages: Mapping[int, int] | Sequence[int]
) -> tuple[list[int], list[int]]:
    """First occurrence of each (slot, offset), in order; ValueError if any is out of range."""
    sizes = dict(slot_npages.items() if isinstance(slot_npages, Mapping) else enumerate(slot_npages))
    pairs = list(zip(slots, offsets, strict=True))
    for slot, offset in pairs:
        if not 0 <= offset < sizes.get(slot, 0):
            raise ValueError(f"slot {slot} offset {offset} is out of range")
    seen: set[tuple[int, int]] = set()
    out_slots: list[int] = []
    out_offsets: list[int] = []
    for pair in pairs:
        if pair not in seen:
            seen.add(pair)
            out_slots.append(pair[0])
            out_offsets.append(pair[1])
    return out_slots, out_offsets


def bitmap_to_pages(words: Iterable[int]) -> list[int]:
    """Set bits of a bitmap of u64 words, bit i of word w being page w * 64 + i."""
    return [w * 64 + bit for w, word in enumerate(words) for bit in range(64) if word >> bit & 1]
