"""Synthetic dirty rings in numpy: no KVM needed for anything under tests/ringreader."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt
import pytest

import ringreader

Ring = npt.NDArray[np.void]
MakeRing = Callable[..., Ring]


def _make_ring(n_entries: int, dirty: Iterable[int] = (), start: int = 0, slot_base: int = 0) -> Ring:
    """A ring whose entries at (start + k) & (n - 1), k in dirty, are DIRTY.

    slot/offset of every entry encode its position so a test can tell them apart:
    slot = slot_base + entry, offset = 1000 + entry.
    """
    ring = np.zeros(n_entries, dtype=ringreader.DIRTY_GFN_DTYPE)
    ring["slot"] = slot_base + np.arange(n_entries, dtype=np.uint32)
    ring["offset"] = 1000 + np.arange(n_entries, dtype=np.uint64)
    for k in dirty:
        ring["flags"][(start + k) & (n_entries - 1)] = ringreader.DIRTY_GFN_F_DIRTY
    return ring


@pytest.fixture
def make_ring() -> MakeRing:
    return _make_ring


def out_arrays(n: int) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64]]:
    return np.zeros(n, dtype=np.uint32), np.zeros(n, dtype=np.uint64)


@pytest.fixture
def outs() -> Callable[[int], tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64]]]:
    return out_arrays
