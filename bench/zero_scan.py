"""The bulk copy's zero-page split: numpy (`_split_zero` as it was: first words, then the doubtful
rows copied out and reduced with `max`) against the C loop in the pagehash shim
(`ph_nonzero_pages`: each page read up to its first non-zero 64-byte block, nothing copied); JSON
out, GB of guest RAM scanned per second, best of interleaved rounds.

The cases are what a batch of guest RAM holds: data pages (the first word decides), pages that
are allocated but zero (hugetlbfs RAM, or RAM a guest touched and zeroed: every byte is read),
half and half, and data pages whose first 2 KiB are zero. Both read the same memory, in batches
of the default 8 MiB, and are checked against each other.

    python bench/zero_scan.py [--mib 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrated.pagehash import nonzero_pages  # noqa: E402

PAGE = 4096
WORDS = PAGE // 8
BATCH_PAGES = (8 << 20) // (PAGE + 16)  # outgoing_setup.batch_pages_for(8 MiB)


def numpy_split(block: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """pagestream._split_zero before the C loop replaced it (kept here as the reference)."""
    words = block.view(np.uint64).reshape(-1, WORDS)
    nonzero: npt.NDArray[np.bool_] = words[:, 0] != 0
    if nonzero.all():
        return nonzero
    doubtful = np.flatnonzero(~nonzero)
    rows = words if doubtful.size == nonzero.size else words[doubtful]
    nonzero[doubtful] = rows.max(axis=1) != 0
    return nonzero


def cases(pages: int) -> dict[str, npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(7)
    data = rng.integers(1, 255, size=(pages, PAGE), dtype=np.uint8)
    zero = np.zeros((pages, PAGE), np.uint8)
    zero[:] = 0  # written: allocated, as zeroed guest RAM is
    half = data.copy()
    half[::2] = 0
    late = data.copy()
    late[:, : PAGE // 2] = 0
    return {"data": data, "zero": zero, "half_zero": half, "data_after_2_kib_of_zeros": late}


def scan_rate(fn: Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.bool_]], ram: npt.NDArray[np.uint8]) -> float:
    started = time.perf_counter()
    for first in range(0, ram.shape[0], BATCH_PAGES):
        fn(ram[first : first + BATCH_PAGES].reshape(-1))
    return ram.nbytes / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="guest RAM per case (default: 256)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, best kept (default: 5)")
    args = parser.parse_args()
    ways: dict[str, Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.bool_]]] = {
        "numpy": numpy_split,
        "c": nonzero_pages,
    }
    out: dict[str, dict[str, float]] = {}
    for name, ram in cases(args.mib * (1 << 20) // PAGE).items():
        flat = ram.reshape(-1)
        if not np.array_equal(numpy_split(flat), nonzero_pages(flat)):
            raise SystemExit(f"{name}: the two disagree")
        best = dict.fromkeys(ways, 0.0)
        for _ in range(args.rounds):
            for way, fn in ways.items():
                best[way] = max(best[way], scan_rate(fn, ram))
        out[name] = {f"{way}_gb_s": round(rate, 2) for way, rate in best.items()}
        out[name]["c_over_numpy"] = round(best["c"] / best["numpy"], 2)
    print(json.dumps({"unit": "GB scanned per second, best of rounds", "mib": args.mib, "cases": out}, indent=2))


if __name__ == "__main__":
    main()
