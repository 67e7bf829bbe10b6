"""Guest RAM: a file mapped MAP_SHARED into the daemon, and the daemon's own dirty bitmap.

The file is a memfd, a file on a huge-page tmpfs or a hugetlbfs memfd, as the operator chose
(`backing.py`). RAM is sparse except on hugetlbfs: tmpfs allocates a page only when it is first
touched, so a 256 GiB guest that writes 16 MiB costs 16 MiB (2 MiB pages: up to 2 MiB per
touched 2 MiB range). Numpy views of it are free. Every write the daemon itself makes into
guest RAM goes through `write()`, which marks the pages in `daemon_dirty` (DESIGN R5: KVM sees
only guest writes).
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import _libc
from .backing import RamBacking, open_ram_file
from .extents import allocated_ranges
from .errors import VmConfigError

PAGE_SIZE = 4096
PAGE_SHIFT = 12


MADV_POPULATE_WRITE = 23  # Linux 5.14
MADV_HUGEPAGE = 14


def populate_write(address: int, length: int) -> None:
    """Allocate (and zero) the pages of a mapped range now, as a write would, without writing
    (madvise MADV_POPULATE_WRITE); OSError on failure."""
    _libc.madvise(address, length, MADV_POPULATE_WRITE)


@dataclass(frozen=True)
class MemoryRegion:
    """One contiguous range of guest-physical RAM, backed by one memslot."""

    slot: int
    guest_phys_addr: int
    size: int
    offset: int  # into the RAM file

    @property
    def pages(self) -> int:
        return self.size >> PAGE_SHIFT


class GuestMemory:
    """All guest RAM of one VM. `close()` unmaps it; views taken before are invalid afterwards."""

    def __init__(self, regions: list[MemoryRegion], name: str = "guest-ram", backing: RamBacking | None = None) -> None:
        if not regions:
            raise VmConfigError("guest memory needs at least one region")
        for region in regions:
            if region.size <= 0 or region.size % PAGE_SIZE or region.guest_phys_addr % PAGE_SIZE:
                raise VmConfigError(
                    f"memory region {region}: size and address must be positive multiples of {PAGE_SIZE} bytes"
                )
        self.regions = tuple(regions)
        self.size = sum(r.size for r in regions)
        self.backing = backing if backing is not None else RamBacking()
        # A file from the daemon's reserve is zeroed, and its pages exist already (ramreserve.py).
        self._reserve = self.backing.reserve if self.backing.kind == "memfd" else None
        fd = self._reserve.take(self.size) if self._reserve is not None else None
        self.from_reserve = fd is not None
        self._fd = fd if fd is not None else open_ram_file(self.backing, name, self.size)
        self.address = 0
        try:
            # hugetlbfs pages were all taken at open (fallocate): a reserving mapping of them
            # costs nothing more, while MAP_NORESERVE there would allow a SIGBUS later.
            flags = _libc.MAP_SHARED | (_libc.MAP_NORESERVE if self.backing.sparse else 0)
            self.address = _libc.mmap(self.size, _libc.PROT_READ | _libc.PROT_WRITE, flags, self._fd, 0)
            if self.backing.kind == "shmem-huge":
                # A tmpfs mounted huge=advise gives huge pages only where asked; the others ignore it.
                try:
                    _libc.madvise(self.address, self.size, MADV_HUGEPAGE)
                except OSError:
                    pass  # a kernel without THP: huge=advise then gives 4 KiB pages, still correct
        except BaseException:
            os.close(self._fd)
            raise
        self._buffer = (ctypes.c_uint8 * self.size).from_address(self.address)
        # The RAM file's bytes, all regions back to back, in file order.
        self.bytes: npt.NDArray[np.uint8] = np.ctypeslib.as_array(self._buffer)
        self._daemon_lock = threading.Lock()
        # Page ranges the daemon wrote, per slot, as (first, last) pairs. Daemon writes are few
        # (loaders, parameter updates), so a list keeps `take_daemon_dirty` independent of the
        # guest's size, unlike a dense per-page map scanned at every harvest.
        self._daemon_dirty: dict[int, list[tuple[int, int]]] = {r.slot: [] for r in regions}

    @classmethod
    def flat(cls, size: int, name: str = "guest-ram", backing: RamBacking | None = None) -> GuestMemory:
        """One region at guest-physical 0: the layout of every guest migrated runs today."""
        return cls([MemoryRegion(slot=0, guest_phys_addr=0, size=size, offset=0)], name, backing)

    @property
    def fd(self) -> int:
        """The RAM file (each region at its `offset`): pwrite fills a fresh page without a fault."""
        return self._fd

    def host_address(self, region: MemoryRegion) -> int:
        return self.address + region.offset

    def fd_for(self, region: MemoryRegion) -> int:
        """The RAM file that holds `region` (valid until `close()`), for pread/pwritev/sendfile.

        Writes through it do not mark the daemon's dirty bitmap: use them for a target's
        incoming pages, never for the daemon's own writes into a running guest (R5). On
        hugetlbfs, write(2) fails with EINVAL: check `backing.writable_by_fd`."""
        if region not in self.regions:
            raise ValueError(f"memory region {region} is not one of this VM's")
        return self._fd

    def file_offset(self, region: MemoryRegion) -> int:
        """Where `region` starts in `fd_for(region)`."""
        if region not in self.regions:
            raise ValueError(f"memory region {region} is not one of this VM's")
        return region.offset

    def region_of(self, gpa: int, length: int = 1) -> MemoryRegion:
        for region in self.regions:
            if region.guest_phys_addr <= gpa and gpa + length <= region.guest_phys_addr + region.size:
                return region
        raise ValueError(f"guest range [{gpa:#x}, {gpa + length:#x}) is not inside guest RAM")

    def view(self, region: MemoryRegion) -> npt.NDArray[np.uint8]:
        return self.bytes[region.offset : region.offset + region.size]

    def read(self, gpa: int, length: int) -> npt.NDArray[np.uint8]:
        region = self.region_of(gpa, length)
        start = region.offset + gpa - region.guest_phys_addr
        return self.bytes[start : start + length]

    def write(self, gpa: int, data: bytes | npt.NDArray[np.generic]) -> None:
        """Write into guest RAM as the daemon, marking the pages dirty (R5)."""
        raw: npt.NDArray[np.uint8] = (
            np.frombuffer(data, dtype=np.uint8)
            if isinstance(data, bytes)
            else np.ascontiguousarray(data).view(np.uint8).ravel()
        )
        if raw.size == 0:
            return
        region = self.region_of(gpa, raw.size)
        start = region.offset + gpa - region.guest_phys_addr
        first = (gpa - region.guest_phys_addr) >> PAGE_SHIFT
        last = (gpa - region.guest_phys_addr + raw.size - 1) >> PAGE_SHIFT
        with self._daemon_lock:
            self.bytes[start : start + raw.size] = raw
            self._daemon_dirty[region.slot].append((first, last))

    def take_daemon_dirty(self) -> dict[int, npt.NDArray[np.uint64]]:
        """Pages the daemon wrote since the last call, per slot; clears the marks."""
        taken: dict[int, npt.NDArray[np.uint64]] = {}
        with self._daemon_lock:
            for slot, ranges in self._daemon_dirty.items():
                parts = [np.arange(first, last + 1, dtype=np.uint64) for first, last in ranges]
                taken[slot] = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
                ranges.clear()
        return taken

    def allocated_bytes(self) -> int:
        """Bytes of the RAM file backed by memory (st_blocks): what a digest of it must read."""
        return os.fstat(self._fd).st_blocks * 512

    def data_extents(self, region: MemoryRegion) -> list[tuple[int, int]]:
        """Page ranges [first, end) of `region` that hold allocated RAM; the rest reads as zero.

        tmpfs answers SEEK_DATA/SEEK_HOLE, so a sparse 256 GiB guest is walked by its extents
        instead of reading 256 GiB of holes (and allocating them on the way); with huge pages
        the extents are whole 2 MiB pages. hugetlbfs RAM is allocated whole at creation and has
        no holes to find: the whole region is one extent.
        """
        if not self.backing.sparse:
            return [(0, region.pages)]
        return [
            ((data - region.offset) >> PAGE_SHIFT, (hole - region.offset + PAGE_SIZE - 1) >> PAGE_SHIFT)
            for data, hole in allocated_ranges(self._fd, region.offset, region.offset + region.size)
        ]

    def data_ranges(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """Byte ranges [start, end), relative to `gpa`, of guest-physical [gpa, gpa + length)
        (inside one region) that hold allocated RAM; the rest reads as zero."""
        region = self.region_of(gpa, length)
        start = region.offset + gpa - region.guest_phys_addr
        if not self.backing.sparse:
            return [(0, length)]
        return [(data - start, hole - start) for data, hole in allocated_ranges(self._fd, start, start + length)]

    def read_sparse(self, gpa: int, length: int) -> npt.NDArray[np.uint8]:
        """A copy of guest-physical [gpa, gpa + length) that reads holes of the RAM file as the
        zeros they are, without touching them: `read` reads through the mapping, and a read
        fault on a shmem hole allocates that page, so one dump of a sparse 256 GiB guest would
        make the host hold 256 GiB (and every later migration read it all back)."""
        out = np.zeros(length, np.uint8)  # calloc: untouched zeros cost no memory either
        base = self.read(gpa, length)
        for first, end in self.data_ranges(gpa, length):
            out[first:end] = base[first:end]
        return out

    def close(self) -> None:
        if self.address:
            del self.bytes
            del self._buffer
            _libc.munmap(self.address, self.size)
            self.address = 0
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._reserve is not None:
                self._reserve.give(fd)  # unmapped above: only the reserve holds it now
            else:
                os.close(fd)
