"""bitmap_to_pages, the bitmap-mode (KVM_GET_DIRTY_LOG) reference path."""

from __future__ import annotations

import numpy as np
import pytest

from ringreader import RingReaderError, bitmap_to_pages, oracle


def _reference(bitmap: np.ndarray) -> list[int]:
    return np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little")).tolist()


@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_matches_unpackbits(density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    bits = rng.random(64 * 777) < density
    bitmap = np.packbits(bits, bitorder="little").view(np.uint64)
    pages = bitmap_to_pages(bitmap)
    assert pages.dtype == np.uint64
    assert pages.tolist() == _reference(bitmap) == np.flatnonzero(bits).tolist()


def test_matches_oracle() -> None:
    bitmap = np.array([0, 1, 2**63, 0, 0xF0F0, 2**64 - 1], dtype=np.uint64)
    assert bitmap_to_pages(bitmap).tolist() == oracle.bitmap_to_pages(bitmap.tolist())


def test_empty_bitmap() -> None:
    assert bitmap_to_pages(np.zeros(0, np.uint64)).tolist() == []


def test_out_parameter() -> None:
    bitmap = np.array([0b1011, 0, 1], dtype=np.uint64)
    out = np.full(10, 7, dtype=np.uint64)
    pages = bitmap_to_pages(bitmap, out)
    assert pages.tolist() == [0, 1, 3, 128]
    assert np.shares_memory(pages, out)


def test_out_too_small() -> None:
    bitmap = np.array([0b1011, 0, 1], dtype=np.uint64)
    with pytest.raises(RingReaderError, match="ENOSPC.*out holds 3 pages"):
        bitmap_to_pages(bitmap, np.zeros(3, np.uint64))


@pytest.mark.parametrize(
    ("bitmap", "match"),
    [
        (np.zeros(4, np.uint8), "bitmap must have dtype uint64"),
        (np.zeros(4, np.int64), "bitmap must have dtype uint64"),
        (np.zeros((2, 2), np.uint64), "bitmap must be 1-D"),
        (np.zeros(8, np.uint64)[::2], "bitmap must be C-contiguous"),
    ],
)
def test_arguments_checked(bitmap: np.ndarray, match: str) -> None:
    with pytest.raises(RingReaderError, match=match):
        bitmap_to_pages(bitmap)


def test_read_only_bitmap_is_fine() -> None:
    bitmap = np.array([6], dtype=np.uint64)
    bitmap.flags.writeable = False
    assert bitmap_to_pages(bitmap).tolist() == [1, 2]
