"""DirtyDedup: first occurrences in order, and every bitmap all-zero again after each call."""

from __future__ import annotations

import numpy as np
import pytest

from ringreader import DirtyDedup, RingReaderError, oracle


def _u32(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint32)


def _u64(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def test_duplicates_removed_first_occurrence_order_kept() -> None:
    dedup = DirtyDedup([100, 200])
    slot, offset = dedup.unique(_u32([1, 0, 1, 0, 1, 1, 0]), _u64([7, 7, 7, 3, 199, 7, 7]))
    assert slot.tolist() == [1, 0, 0, 1]
    assert offset.tolist() == [7, 7, 3, 199]
    assert slot.dtype == np.uint32 and offset.dtype == np.uint64
    assert dedup.bitmaps_are_clear()


def test_same_page_is_new_again_next_call() -> None:
    # R3: "The same page can come back after every reset"
    dedup = DirtyDedup([64])
    for _ in range(3):
        slot, offset = dedup.unique(_u32([0, 0]), _u64([5, 5]))
        assert offset.tolist() == [5]


def test_empty_input() -> None:
    dedup = DirtyDedup([10])
    slot, offset = dedup.unique(_u32([]), _u64([]))
    assert len(slot) == len(offset) == 0


def test_sparse_slot_ids_from_mapping() -> None:
    # slot = (as_id << 16) | id: address space 1 (x86 SMM) makes ids sparse.
    dedup = DirtyDedup({0: 65, 0x10001: 3})
    slot, offset = dedup.unique(_u32([0x10001, 0, 0x10001, 0]), _u64([2, 64, 2, 64]))
    assert slot.tolist() == [0x10001, 0]
    assert offset.tolist() == [2, 64]
    assert dedup.slot_npages == {0: 65, 0x10001: 3}
    assert dedup.bitmaps_are_clear()


@pytest.mark.parametrize(
    ("slot", "offset", "match"),
    [
        (5, 0, "entry 2 names slot 5, tracked slots are \\[0, 1, 3\\]"),
        (2, 0, "entry 2 names slot 2"),  # a hole between tracked ids
        (1, 64, "entry 2: offset 64 is outside slot 1, which has 64 pages"),
        (0, 2**64 - 1, "offset 18446744073709551615 is outside slot 0"),
        (3, 0, "entry 2: offset 0 is outside slot 3, which has 0 pages"),
    ],
)
def test_out_of_range_raises_and_leaves_bitmaps_zero(slot: int, offset: int, match: str) -> None:
    dedup = DirtyDedup({0: 10, 1: 64, 3: 0})
    with pytest.raises(RingReaderError, match=match):
        dedup.unique(_u32([0, 1, slot, 0]), _u64([1, 63, offset, 9]))
    assert dedup.bitmaps_are_clear()
    # The valid entries before the bad one were not marked as seen either.
    slot_out, offset_out = dedup.unique(_u32([0, 1]), _u64([1, 63]))
    assert offset_out.tolist() == [1, 63]


def test_last_page_of_odd_sized_slot() -> None:
    dedup = DirtyDedup([65])
    assert dedup.unique(_u32([0]), _u64([64]))[1].tolist() == [64]
    with pytest.raises(RingReaderError):
        dedup.unique(_u32([0]), _u64([65]))


def test_huge_slot_costs_only_what_is_touched() -> None:
    # A 256 GiB slot: 2**26 pages, an 8 MiB bitmap left as lazy zero pages.
    dedup = DirtyDedup([2**26])
    offsets = _u64([2**26 - 1, 0, 2**25, 2**26 - 1])
    assert dedup.unique(_u32([0] * 4), offsets)[1].tolist() == [2**26 - 1, 0, 2**25]
    assert dedup.bitmaps_are_clear()


@pytest.mark.parametrize("seed", range(20))
def test_matches_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = {int(s): int(rng.integers(1, 5000)) for s in rng.choice(40, size=4, replace=False)}
    dedup = DirtyDedup(sizes)
    keys = np.array(sorted(sizes), dtype=np.uint32)
    for _ in range(5):
        n = int(rng.integers(0, 3000))
        slot = rng.choice(keys, size=n).astype(np.uint32)
        # Narrow offset ranges so duplicates are common.
        span = np.array([min(sizes[int(s)], 200) for s in slot], dtype=np.uint64)
        offset = (rng.integers(0, 2**62, n).astype(np.uint64) % np.maximum(span, 1)).astype(np.uint64)
        got_slot, got_offset = dedup.unique(slot, offset)
        want_slot, want_offset = oracle.dedup(slot.tolist(), offset.tolist(), sizes)
        assert got_slot.tolist() == want_slot
        assert got_offset.tolist() == want_offset
        assert dedup.bitmaps_are_clear()


def test_oracle_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        oracle.dedup([0], [10], [10])


@pytest.mark.parametrize(
    ("slot", "offset", "match"),
    [
        (np.zeros(2, np.int64), _u64([0, 0]), "slot must have dtype uint32"),
        (_u32([0, 0]), np.zeros(2, np.int64), "offset must have dtype uint64"),
        (_u32([0, 0]), _u64([0]), "same length, got 2 and 1"),
        (_u32([0, 0, 0, 0])[::2], _u64([0, 0]), "slot must be C-contiguous"),
        ([0], _u64([0]), "slot must be a numpy array"),
    ],
)
def test_arguments_checked(slot: object, offset: object, match: str) -> None:
    with pytest.raises(RingReaderError, match=match):
        DirtyDedup([10]).unique(slot, offset)  # type: ignore[arg-type]


def test_read_only_inputs_are_fine() -> None:
    slot, offset = _u32([0, 0]), _u64([1, 1])
    slot.flags.writeable = offset.flags.writeable = False
    assert DirtyDedup([10]).unique(slot, offset)[1].tolist() == [1]


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ({-1: 10}, "slot id must be in"),
        ({1 << 20: 10}, "slot id must be in"),
        ([-5], "page count of slot 0 must be in"),
        ([1 << 53], "page count of slot 0 must be in"),
        ([1.5], "page count of slot 0 must be an integer"),
    ],
)
def test_constructor_checks(sizes: object, match: str) -> None:
    with pytest.raises(RingReaderError, match=match):
        DirtyDedup(sizes)  # type: ignore[arg-type]


def test_no_slots_rejects_everything() -> None:
    dedup = DirtyDedup([])
    assert len(dedup.unique(_u32([]), _u64([]))[0]) == 0
    with pytest.raises(RingReaderError, match="names slot 0"):
        dedup.unique(_u32([0]), _u64([0]))
