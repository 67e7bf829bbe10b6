"""Memory digest of guest RAM: per-page hashes in C, combined with SHA-256.

The source computes it from its RAM as it stands while paused (so a page the dirty tracking
missed is caught), the target after loading; cutover compares the two.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._pagehash import ffi, lib  # type: ignore[import-not-found]

PAGE_SIZE = 4096
ABI_VERSION = 1
if lib.ph_abi_version() != ABI_VERSION:
    raise ImportError(
        f"migrated.pagehash: compiled ABI {lib.ph_abi_version()}, sources expect {ABI_VERSION}: "
        "rebuild with `make build`"
    )


def page_hashes(ram: npt.NDArray[np.uint8], first_pfn: int = 0) -> npt.NDArray[np.uint64]:
    """One 64-bit hash per 4 KiB page of `ram` (contiguous, whole pages)."""
    if ram.dtype != np.uint8 or ram.ndim != 1 or not ram.flags.c_contiguous:
        raise ValueError("ram must be a contiguous 1-D uint8 array")
    if ram.size % PAGE_SIZE:
        raise ValueError(f"ram is {ram.size} bytes: not a whole number of {PAGE_SIZE}-byte pages")
    npages = ram.size // PAGE_SIZE
    out = np.empty(npages, np.uint64)
    if npages:
        result = lib.ph_page_hashes(
            ffi.from_buffer("uint8_t[]", ram), npages, first_pfn, ffi.from_buffer("uint64_t[]", out)
        )
        if result != npages:
            raise ValueError(f"ph_page_hashes failed: {result}")
    return out


@dataclass(frozen=True)
class RamDigest:
    sha256: bytes
    pages: int

    def hex(self) -> str:
        return self.sha256.hex()


def ram_digest(regions: list[tuple[int, npt.NDArray[np.uint8]]]) -> RamDigest:
    """Digest of guest RAM given as (guest-physical address, bytes) regions, in address order."""
    combined = hashlib.sha256()
    pages = 0
    for gpa, ram in sorted(regions, key=lambda r: r[0]):
        hashes = page_hashes(ram, gpa // PAGE_SIZE)
        combined.update(hashes.tobytes())
        pages += hashes.size
    return RamDigest(combined.digest(), pages)
