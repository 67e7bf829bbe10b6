"""The working-set page format in numpy: a reference writer and the vectorized checker.

Mirrors `x86_64/page.h` word for word (tests compile page.h natively and compare). A page is an
8-word header (magic, GPA, generation | vCPU << 32, global index, body checksum, three zero
words) and a 504-word body; body word i is x ^ (x >> 29) with x = base + i * STEP and
base = mix64(gpa ^ seed ^ gen * GOLDEN). The checksum is sum(word_i * (2i + 1)) mod 2^64.
All arithmetic is uint64 and wraps, in C and in numpy alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import abi
from .layout import WorkloadLayout

U64 = npt.NDArray[np.uint64]

_WORD_INDEX = np.arange(abi.WL_HEADER_WORDS, abi.WL_PAGE_WORDS, dtype=np.uint64)
_WEIGHTS = 2 * _WORD_INDEX + np.uint64(1)
_OFFSETS = _WORD_INDEX * np.uint64(abi.WL_STEP)
CHUNK_PAGES = 4096  # bounds the checker's temporaries to a few tens of MiB


def mix64(z: U64) -> U64:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(abi.WL_MIX_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(abi.WL_MIX_M2)
    return z ^ (z >> np.uint64(31))


def bodies(gpas: U64, gens: U64, seed: int) -> U64:
    """(n, 504) body words of pages at `gpas` with generations `gens`."""
    base = mix64(gpas ^ np.uint64(seed) ^ (gens * np.uint64(abi.WL_GOLDEN)))
    x: U64 = base[:, None] + _OFFSETS[None, :]
    return x ^ (x >> np.uint64(29))


def checksums(body: U64) -> U64:
    """Checksum of each row of an (n, 504) body array."""
    sums: U64 = (body * _WEIGHTS).sum(axis=1, dtype=np.uint64)
    return sums


def render_pages(gpas: U64, indices: U64, gens: U64, vcpus: U64, seed: int) -> U64:
    """Reference writer: (n, 512) words of the given pages, as the guest would write them."""
    n = gpas.size
    pages = np.zeros((n, abi.WL_PAGE_WORDS), np.uint64)
    body = bodies(gpas, gens, seed)
    pages[:, abi.WL_HEADER_WORDS :] = body
    pages[:, abi.WL_H_MAGIC] = abi.WL_PAGE_MAGIC
    pages[:, abi.WL_H_GPA] = gpas
    pages[:, abi.WL_H_GEN] = gens | (vcpus << np.uint64(32))
    pages[:, abi.WL_H_INDEX] = indices
    pages[:, abi.WL_H_CHECKSUM] = checksums(body)
    return pages


@dataclass(frozen=True)
class VerifyReport:
    pages_checked: int
    pages_written: int  # generation != 0
    in_flight: int  # being written when the vCPUs stopped: not judged
    bad_pages: int
    bad_header: int  # written pages whose header disagrees with GPA, vCPU or generation array
    bad_checksum: int
    bad_pattern: int  # body differs from the formula (only with pattern=True)
    bad_unwritten: int  # generation 0 but not all zero
    first_bad: tuple[int, ...]  # GPAs

    @property
    def ok(self) -> bool:
        return self.bad_pages == 0


def _u64_at(ram: npt.NDArray[np.uint8], gpa: int, words: int) -> U64:
    return ram[gpa : gpa + 8 * words].view(np.uint64)


def in_flight_pages(ram: npt.NDArray[np.uint8], layout: WorkloadLayout) -> U64:
    """Global indices of the pages the vCPUs were busy with (may be torn while stopped)."""
    busy = [int(_u64_at(ram, layout.status_gpa(v), abi.WL_PAGE_WORDS)[abi.WL_S_BUSY_PAGE]) for v in range(layout.vcpus)]
    return np.array([b - 1 for b in busy if 0 < b <= layout.ws_pages], dtype=np.uint64)


def verify_pages(
    ram: npt.NDArray[np.uint8],
    layout: WorkloadLayout,
    *,
    pattern: bool = True,
    max_reported: int = 8,
) -> VerifyReport:
    """Checks every working-set page against its own header and the generation arrays.

    Only meaningful while the vCPUs are stopped. The page a vCPU was in the middle of (its status
    page's busy marker) is skipped. With `pattern`, the body is also compared with the formula,
    which catches a page replaced by a self-consistent page of another generation.
    """
    n = layout.ws_pages
    pages = ram[layout.ws_base : layout.ws_end].view(np.uint64).reshape(n, abi.WL_PAGE_WORDS)
    gens_all = ram[layout.gen : layout.gen + 4 * n].view(np.uint32)
    seed = int(_u64_at(ram, layout.params, abi.WL_PAGE_WORDS)[abi.WL_P_SEED])
    starts = np.array([layout.share(v)[0] for v in range(layout.vcpus)], dtype=np.uint64)
    skip = in_flight_pages(ram, layout)
    counts = dict(written=0, in_flight=0, bad=0, header=0, checksum=0, pattern=0, unwritten=0)
    first_bad: list[int] = []
    for start in range(0, n, CHUNK_PAGES):
        end = min(n, start + CHUNK_PAGES)
        pg = pages[start:end]
        idx = np.arange(start, end, dtype=np.uint64)
        gpa = np.uint64(layout.ws_base) + idx * np.uint64(abi.WL_PAGE_SIZE)
        gen = gens_all[start:end].astype(np.uint64)
        vcpu = (np.searchsorted(starts, idx, side="right") - 1).astype(np.uint64)
        written = gen != 0
        header_ok = (
            (pg[:, abi.WL_H_MAGIC] == np.uint64(abi.WL_PAGE_MAGIC))
            & (pg[:, abi.WL_H_GPA] == gpa)
            & (pg[:, abi.WL_H_GEN] == (gen | (vcpu << np.uint64(32))))
            & (pg[:, abi.WL_H_INDEX] == idx)
            & ~pg[:, abi.WL_H_CHECKSUM + 1 : abi.WL_HEADER_WORDS].any(axis=1)
        )
        body = pg[:, abi.WL_HEADER_WORDS :]
        checksum_ok = pg[:, abi.WL_H_CHECKSUM] == checksums(body)
        pattern_ok = np.ones(end - start, bool)
        if pattern:
            pattern_ok = (body == bodies(gpa, gen, seed)).all(axis=1)
        zero_ok = ~pg.any(axis=1)
        flying = np.isin(idx, skip)
        judged_written = written & ~flying
        judged_unwritten = ~written & ~flying
        bad = (judged_written & ~(header_ok & checksum_ok & pattern_ok)) | (judged_unwritten & ~zero_ok)
        counts["written"] += int(written.sum())
        counts["in_flight"] += int(flying.sum())
        counts["bad"] += int(bad.sum())
        counts["header"] += int((judged_written & ~header_ok).sum())
        counts["checksum"] += int((judged_written & ~checksum_ok).sum())
        counts["pattern"] += int((judged_written & ~pattern_ok).sum())
        counts["unwritten"] += int((judged_unwritten & ~zero_ok).sum())
        if len(first_bad) < max_reported and bad.any():
            first_bad.extend(int(g) for g in gpa[bad][: max_reported - len(first_bad)])
    return VerifyReport(
        pages_checked=n,
        pages_written=counts["written"],
        in_flight=counts["in_flight"],
        bad_pages=counts["bad"],
        bad_header=counts["header"],
        bad_checksum=counts["checksum"],
        bad_pattern=counts["pattern"],
        bad_unwritten=counts["unwritten"],
        first_bad=tuple(first_bad),
    )
