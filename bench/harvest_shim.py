"""Dirty-ring harvest speed: the C shim against the pure-Python loop, measured in the same run.

A synthetic 65,536-entry ring (1 MiB, the largest ring this host's KVM allows) is marked all
DIRTY with one vectorized numpy write before every timed harvest; that write is not timed. Each
figure is the median of several repetitions. Run from the repository root:
``python3 bench/harvest_shim.py`` prints the figures as JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the in-tree package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import numpy.typing as npt

import ringreader
from ringreader import oracle

N_ENTRIES = 65_536


def _fresh_ring() -> npt.NDArray[np.void]:
    ring = np.zeros(N_ENTRIES, dtype=ringreader.DIRTY_GFN_DTYPE)
    ring["slot"] = np.arange(N_ENTRIES, dtype=np.uint32) % 4
    ring["offset"] = np.arange(N_ENTRIES, dtype=np.uint64) * 7
    return ring


def _rate(harvest_all: Callable[[], int], ring: npt.NDArray[np.void], inner: int) -> float:
    """Entries per second over `inner` full-ring harvests; only the harvests are timed."""
    flags = ring["flags"]
    elapsed = 0.0
    for _ in range(inner):
        flags[:] = ringreader.DIRTY_GFN_F_DIRTY
        start = time.perf_counter()
        count = harvest_all()
        elapsed += time.perf_counter() - start
        if count != N_ENTRIES:
            raise RuntimeError(f"harvested {count} of {N_ENTRIES} entries")
    return inner * N_ENTRIES / elapsed


def measure_entries_per_s(repeats: int = 7) -> dict[str, float]:
    """Median harvest rates of the shim and of the pure-Python oracle, in entries/s."""
    ring = _fresh_ring()
    out_slot = np.zeros(N_ENTRIES, dtype=np.uint32)
    out_offset = np.zeros(N_ENTRIES, dtype=np.uint64)
    index = 2**32 - N_ENTRIES // 2  # wraps the u32 index on the way, as a long run would

    def shim() -> int:
        nonlocal index
        count, index = ringreader.harvest(ring, N_ENTRIES, index, out_slot, out_offset)
        return count

    def python() -> int:
        nonlocal index
        slots, _, index = oracle.harvest(ring, N_ENTRIES, index)
        return len(slots)

    # Both must see the same work: check one harvest of each against the other, untimed.
    ring["flags"] = ringreader.DIRTY_GFN_F_DIRTY
    shim()
    ring["flags"] = ringreader.DIRTY_GFN_F_DIRTY
    _, py_offsets, index = oracle.harvest(ring, N_ENTRIES, index)
    if py_offsets != out_offset.tolist():
        raise RuntimeError("shim and pure-Python harvests disagree")

    shim_rates = [_rate(shim, ring, inner=50) for _ in range(repeats)]
    python_rates = [_rate(python, ring, inner=2) for _ in range(repeats)]
    return {
        "shim_entries_per_s": statistics.median(shim_rates),
        "python_entries_per_s": statistics.median(python_rates),
    }


if __name__ == "__main__":
    print(json.dumps(measure_entries_per_s(), indent=2))
