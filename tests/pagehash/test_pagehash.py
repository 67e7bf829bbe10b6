"""The memory digest: the C per-page hash against a pure-Python oracle, and what it detects."""

from __future__ import annotations

import numpy as np
import pytest

from migrated.pagehash import PAGE_SIZE, nonzero_pages, page_hashes, ram_digest

M = (1 << 64) - 1
P1, P2, P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M


def _oracle(page: bytes, pfn: int) -> int:
    """The loop of pagehash.c, word by word, in Python integers."""
    lanes = [(P1 + 1) & M, (P2 + 2) & M, (P3 + 3) & M, P1 ^ P2]
    words = np.frombuffer(page, np.uint64).tolist()
    for i, word in enumerate(words):
        lane = i % 4
        lanes[lane] = (_rotl((lanes[lane] + word * P2) & M, 31) * P1) & M
    a, b, c, d = lanes
    h = ((_rotl(a, 1) + _rotl(b, 7) + _rotl(c, 12) + _rotl(d, 18)) & M) ^ ((pfn * P3) & M)
    h ^= h >> 33
    h = (h * P2) & M
    h ^= h >> 29
    h = (h * P3) & M
    h ^= h >> 32
    return h


def test_c_matches_the_oracle() -> None:
    rng = np.random.default_rng(7)
    ram = rng.integers(0, 256, 4 * PAGE_SIZE, dtype=np.uint8)
    ram[PAGE_SIZE : 2 * PAGE_SIZE] = 0
    hashes = page_hashes(ram, first_pfn=1000)
    for i in range(4):
        assert int(hashes[i]) == _oracle(ram[i * PAGE_SIZE : (i + 1) * PAGE_SIZE].tobytes(), 1000 + i)


def test_every_single_byte_flip_changes_the_digest() -> None:
    rng = np.random.default_rng(1)
    ram = rng.integers(0, 256, 2 * PAGE_SIZE, dtype=np.uint8)
    base = ram_digest([(0, ram)])
    for offset in rng.choice(ram.size, 64, replace=False):
        flipped = ram.copy()
        flipped[offset] ^= 1 << int(rng.integers(0, 8))
        assert ram_digest([(0, flipped)]) != base, offset


def test_same_contents_at_another_address_differ() -> None:
    page = np.full(PAGE_SIZE, 0x5A, np.uint8)
    assert page_hashes(page, 1)[0] != page_hashes(page, 2)[0]
    swapped = np.concatenate([np.zeros(PAGE_SIZE, np.uint8), page])
    assert ram_digest([(0, np.concatenate([page, np.zeros(PAGE_SIZE, np.uint8)]))]) != ram_digest([(0, swapped)])


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="whole number of 4096-byte pages"):
        page_hashes(np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match="contiguous 1-D uint8"):
        page_hashes(np.zeros((2, PAGE_SIZE), np.uint8))


def test_sparse_digest_equals_the_dense_one() -> None:
    """Holes hash as the zero pages they read as; extents may be wider than the data."""
    from migrated.pagehash import zero_page_hashes

    rng = np.random.default_rng(3)
    ram = np.zeros(64 * PAGE_SIZE, np.uint8)
    ram[5 * PAGE_SIZE : 9 * PAGE_SIZE] = rng.integers(1, 256, 4 * PAGE_SIZE, dtype=np.uint8)
    ram[40 * PAGE_SIZE + 7] = 1
    dense = ram_digest([(1 << 20, ram)])
    assert ram_digest([(1 << 20, ram)], [[(5, 9), (40, 41)]]) == dense
    assert ram_digest([(1 << 20, ram)], [[(0, 12), (39, 64)]]) == dense
    assert ram_digest([(1 << 20, ram)], [[(5, 9)]]) != dense  # page 40 left out: caught
    np.testing.assert_array_equal(zero_page_hashes(3, 77), page_hashes(np.zeros(3 * PAGE_SIZE, np.uint8), 77))


# ---- the zero-page split (ph_nonzero_pages) --------------------------------------------------


def test_nonzero_pages_matches_numpy_wherever_the_byte_lies() -> None:
    """Every byte position of a page, one page each, and pages of zeros between: the C loop reads
    the first word, then the whole page; numpy's `any` over every byte is the oracle."""
    pages = PAGE_SIZE + 3
    ram = np.zeros((pages, PAGE_SIZE), np.uint8)
    ram[np.arange(PAGE_SIZE), np.arange(PAGE_SIZE)] = 0x80  # page i: byte i only
    ram[PAGE_SIZE + 1, :] = 0x5A  # a full data page; PAGE_SIZE and PAGE_SIZE + 2 stay zero
    got = nonzero_pages(ram.reshape(-1))
    assert got.dtype == np.bool_
    assert (got == ram.any(axis=1)).all()
    assert got[: PAGE_SIZE + 2].tolist() == [True] * PAGE_SIZE + [False, True]


def test_nonzero_pages_refuses_what_is_not_whole_contiguous_pages() -> None:
    ram = np.zeros(2 * PAGE_SIZE, np.uint8)
    with pytest.raises(ValueError, match="whole number"):
        nonzero_pages(ram[:-1])
    with pytest.raises(ValueError, match="contiguous"):
        nonzero_pages(ram[::2])
    with pytest.raises(ValueError, match="contiguous"):
        nonzero_pages(ram.view(np.uint16))
    assert nonzero_pages(ram[:0]).size == 0
