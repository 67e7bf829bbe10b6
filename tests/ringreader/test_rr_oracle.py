"""The shim against the pure-Python oracle on randomized rings (fixed seeds, numpy random)."""

from __future__ import annotations

import numpy as np
import pytest

import ringreader
from ringreader import oracle

U32 = 2**32


def _random_ring(rng: np.random.Generator, n: int) -> np.ndarray:
    ring = np.zeros(n, dtype=ringreader.DIRTY_GFN_DTYPE)
    ring["slot"] = rng.integers(0, 2**32, n, dtype=np.uint32)
    ring["offset"] = rng.integers(0, 2**64, n, dtype=np.uint64)
    # Mostly dirty with occasional clean/RESET/both-bits entries, so runs end at random places.
    ring["flags"] = rng.choice([0, 1, 2, 3], size=n, p=[0.04, 0.9, 0.03, 0.03])
    return ring


@pytest.mark.parametrize("seed", range(40))
def test_shim_matches_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 1 << int(rng.integers(0, 11))
    ring = _random_ring(rng, n)
    twin = ring.copy()
    index = int(rng.choice([0, int(rng.integers(0, U32)), U32 - int(rng.integers(1, 2 * n + 1))]))
    out_slot = np.zeros(2 * n, np.uint32)
    out_offset = np.zeros(2 * n, np.uint64)
    for _ in range(6):
        capacity = int(rng.integers(0, 2 * n + 1))
        count, new_index = ringreader.harvest(ring, n, index, out_slot, out_offset, capacity)
        slots, offsets, oracle_index = oracle.harvest(twin, n, index, capacity)
        assert out_slot[:count].tolist() == slots
        assert out_offset[:count].tolist() == offsets
        assert new_index == oracle_index
        assert ring.tobytes() == twin.tobytes()
        index = new_index
        # Refill some entries as KVM would after a reset, in both copies alike.
        refill = rng.random(n) < 0.5
        ring["flags"][refill] = twin["flags"][refill] = 1


def test_oracle_rejects_what_the_shim_rejects() -> None:
    with pytest.raises(ValueError, match="power of two"):
        oracle.harvest(bytearray(16 * 6), 6, 0)
    with pytest.raises(ValueError, match="bytes"):
        oracle.harvest(bytearray(16 * 7), 8, 0)
