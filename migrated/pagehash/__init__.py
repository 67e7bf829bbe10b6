"""Memory digest of guest RAM: per-page hashes in C, combined with SHA-256.

The source computes it from its RAM as it stands while paused (so a page the dirty tracking
missed is caught), the target after loading; cutover compares the two.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..kvm.memory import GuestMemory
from ._pagehash import ffi, lib

PAGE_SIZE = 4096
ABI_VERSION = 2
if lib.ph_abi_version() != ABI_VERSION:
    raise ImportError(
        f"migrated.pagehash: compiled ABI {lib.ph_abi_version()}, sources expect {ABI_VERSION}: "
        "rebuild with `make build`"
    )


def _whole_pages(ram: npt.NDArray[np.uint8]) -> int:
    """How many pages `ram` holds; ValueError unless it is contiguous bytes of whole pages."""
    if ram.dtype != np.uint8 or ram.ndim != 1 or not ram.flags.c_contiguous:
        raise ValueError("ram must be a contiguous 1-D uint8 array")
    if ram.size % PAGE_SIZE:
        raise ValueError(f"ram is {ram.size} bytes: not a whole number of {PAGE_SIZE}-byte pages")
    return ram.size // PAGE_SIZE


def page_hashes(ram: npt.NDArray[np.uint8], first_pfn: int = 0) -> npt.NDArray[np.uint64]:
    """One 64-bit hash per 4 KiB page of `ram` (contiguous, whole pages)."""
    npages = _whole_pages(ram)
    out = np.empty(npages, np.uint64)
    if npages:
        result = lib.ph_page_hashes(
            ffi.from_buffer("uint8_t[]", ram), npages, first_pfn, ffi.from_buffer("uint64_t[]", out)
        )
        if result != npages:
            raise ValueError(f"ph_page_hashes failed: {result}")
    return out


def nonzero_pages(ram: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """True for each 4 KiB page of `ram` (contiguous, whole pages) that holds a non-zero byte.

    The bulk copy's zero-page split: each page is read up to its first non-zero 64-byte block,
    nothing is copied, and the GIL is released (bench/zero_scan.py against numpy)."""
    npages = _whole_pages(ram)
    out = np.empty(npages, np.uint8)
    if npages:
        result = lib.ph_nonzero_pages(ffi.from_buffer("uint8_t[]", ram), npages, ffi.from_buffer("uint8_t[]", out))
        if result < 0:
            raise ValueError(f"ph_nonzero_pages failed: {result}")
    return out.view(np.bool_)


@dataclass(frozen=True)
class RamDigest:
    sha256: bytes
    pages: int

    def hex(self) -> str:
        return self.sha256.hex()


def zero_page_hashes(npages: int, first_pfn: int) -> npt.NDArray[np.uint64]:
    """What `page_hashes` gives for all-zero pages, computed without reading guest RAM."""
    out = np.empty(npages, np.uint64)
    if npages:
        lib.ph_zero_page_hashes(npages, first_pfn, ffi.from_buffer("uint64_t[]", out))
    return out


Extents = list[tuple[int, int]]


def ram_digest(regions: list[tuple[int, npt.NDArray[np.uint8]]], extents: list[Extents] | None = None) -> RamDigest:
    """Digest of guest RAM given as (guest-physical address, bytes) regions, in address order.

    `extents` (one list per region, page ranges [first, end) that hold data) lets holes of a
    sparse memfd count as the zero pages they read as, without touching (and so allocating)
    them; the digest is the same as with every page read.
    """
    combined = hashlib.sha256()
    pages = 0
    order = sorted(range(len(regions)), key=lambda i: regions[i][0])
    for i in order:
        gpa, ram = regions[i]
        first_pfn = gpa // PAGE_SIZE
        npages = ram.size // PAGE_SIZE
        hashes = page_hashes(ram, first_pfn) if extents is None else _sparse_hashes(ram, first_pfn, npages, extents[i])
        combined.update(hashes.tobytes())
        pages += hashes.size
    return RamDigest(combined.digest(), pages)


# The digest runs while the VM is paused, when its vCPUs leave the cores idle: the C loop
# releases the GIL, so chunks of this many pages are hashed on several threads at once.
_CHUNK_PAGES = 16384
_THREADS = max(1, min(4, os.cpu_count() or 1))


def _sparse_hashes(ram: npt.NDArray[np.uint8], first_pfn: int, npages: int, extents: Extents) -> npt.NDArray[np.uint64]:
    hashes = np.empty(npages, np.uint64)
    data: list[tuple[int, int]] = []
    cursor = 0
    for first, end in sorted(extents) + [(npages, npages)]:
        first, end = max(first, cursor), min(end, npages)
        if first > cursor:
            hashes[cursor:first] = zero_page_hashes(first - cursor, first_pfn + cursor)
        data += [(s, min(s + _CHUNK_PAGES, end)) for s in range(first, end, _CHUNK_PAGES)]
        cursor = max(cursor, end)

    def hash_chunk(chunk: tuple[int, int]) -> None:
        first, end = chunk
        hashes[first:end] = page_hashes(ram[first * PAGE_SIZE : end * PAGE_SIZE], first_pfn + first)

    if len(data) > 1 and _THREADS > 1:
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(hash_chunk, data))
    else:
        for chunk in data:
            hash_chunk(chunk)
    return hashes


def memory_digest(memory: GuestMemory) -> RamDigest:
    """The digest of a VM's guest RAM as it stands, touching only its allocated extents."""
    return ram_digest(
        [(r.guest_phys_addr, memory.view(r)) for r in memory.regions],
        [memory.data_extents(r) for r in memory.regions],
    )
