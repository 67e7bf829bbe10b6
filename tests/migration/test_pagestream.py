"""The sender's zero-page split against a plain numpy oracle (`any` over every byte)."""

from __future__ import annotations

import numpy as np
import pytest

from migrated.migration.pagestream import PAGE_SIZE, _split_zero


def oracle(block: np.ndarray) -> np.ndarray:
    return np.asarray(block.reshape(-1, PAGE_SIZE).any(axis=1))


@pytest.mark.parametrize("pages", [1, 7, 512])
def test_split_zero_matches_oracle_wherever_the_byte_lies(pages: int) -> None:
    rng = np.random.default_rng(pages)
    block = np.zeros((pages, PAGE_SIZE), np.uint8)
    marked = rng.choice(pages, size=max(1, pages // 3), replace=False)
    # Every page is marked at a different place: first word, last byte, in between.
    positions = rng.integers(0, PAGE_SIZE, marked.size)
    positions[0] = PAGE_SIZE - 1  # behind the first word: only the full scan sees it
    block[marked, positions] = rng.integers(1, 256, marked.size, dtype=np.uint8)
    assert (_split_zero(block.reshape(-1)) == oracle(block)).all()


def test_split_zero_all_data_all_zero_and_first_word_zero() -> None:
    data = np.full((4, PAGE_SIZE), 0x5A, np.uint8)
    assert _split_zero(data.reshape(-1)).all()
    assert not _split_zero(np.zeros(4 * PAGE_SIZE, np.uint8)).any()
    data[:, :8] = 0  # a data page that starts with a zero word is still data
    data[2] = 0
    assert _split_zero(data.reshape(-1)).tolist() == [True, True, False, True]
