"""Where guest RAM lives: the file behind a VM's memory, by the operator's choice of backing.

- "memfd": an anonymous shmem file (memfd_create). 4 KiB pages (this host's `shmem_enabled` is
  `never`), sparse, `pwrite` fills a fresh page without a fault.
- "shmem-huge": an unnamed file (O_TMPFILE) on a tmpfs mounted with `huge=`: 2 MiB pages where
  the file's size covers them, still sparse (a hole costs nothing), still `pwrite`-able. O_TMPFILE
  never gives the file a name, so a crash leaves nothing behind in the directory.
- "hugetlbfs": memfd_create(MFD_HUGETLB) from the pool reserved in /proc/sys/vm/nr_hugepages.
  All of it is allocated at creation (fallocate), so a pool too small is an error now, naming the
  shortfall, and never a SIGBUS in a vCPU later. hugetlbfs refuses write(2) (EINVAL) and is not
  sparse: SEEK_DATA sees one extent, the whole file.

Whatever the backing, KVM tracks dirty pages at 4 KiB: a memslot with KVM_MEM_LOG_DIRTY_PAGES is
mapped with 4 KiB pages in the guest's page tables, whatever backs the host side.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, field
from typing import Literal

from .errors import VmConfigError
from .ramreserve import FILE_NAME as RESERVE_FILE_NAME, ReserveClaim

MemoryBacking = Literal["memfd", "shmem-huge", "hugetlbfs"]
MEMORY_BACKINGS: tuple[MemoryBacking, ...] = ("memfd", "shmem-huge", "hugetlbfs")
HUGE_PAGE_SIZE = 2 << 20  # x86_64 and arm64 (4 KiB granule) PMD size; hugetlbfs' default here
# tmpfs `huge=` values that give 2 MiB pages: `advise` only where MADV_HUGEPAGE asks (GuestMemory
# does); `never` and `deny` give none.
HUGE_TMPFS_MODES = ("always", "within_size", "advise")
MFD_HUGETLB = 0x0004
TMPFS = "tmpfs"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


class MemoryBackingError(VmConfigError):
    """A backing that cannot hold this VM's RAM here; the message says why and what to change."""


@dataclass(frozen=True)
class RamBacking:
    """The operator's choice for one VM. `directory`: for "shmem-huge", the huge-page tmpfs."""

    kind: MemoryBacking = "memfd"
    directory: str = ""
    # The daemon's reserve of zeroed RAM files (ramreserve.py), for memfd RAM: where a new VM's
    # file comes from if one is kept, and where a closed VM's file goes.
    reserve: ReserveClaim | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in MEMORY_BACKINGS:
            raise MemoryBackingError(f"memory backing {self.kind!r}: allowed are {', '.join(MEMORY_BACKINGS)}")
        if self.kind == "shmem-huge" and not self.directory:
            raise MemoryBackingError("memory backing 'shmem-huge' needs the directory of a huge-page tmpfs")

    @property
    def huge_pages(self) -> bool:
        return self.kind != "memfd"

    @property
    def sparse(self) -> bool:
        """Unwritten RAM costs nothing and SEEK_DATA/SEEK_HOLE find what was written."""
        return self.kind != "hugetlbfs"

    @property
    def writable_by_fd(self) -> bool:
        """`pwrite`/`pwritev` into the RAM file work (hugetlbfs: EINVAL; write through the mapping)."""
        return self.kind != "hugetlbfs"


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    options: tuple[str, ...]  # the superblock's options (mountinfo's last field)

    def option(self, key: str) -> str | None:
        for option in self.options:
            name, _, value = option.partition("=")
            if name == key:
                return value
        return None


def mount_of(path: str) -> Mount:
    """The mount that holds `path` (the longest mount point above it in /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best: Mount | None = None
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        for line in file:
            fields = line.split()
            separator = fields.index("-")
            mount_point = _unescape(fields[4])
            if real != mount_point and not real.startswith(mount_point.rstrip("/") + "/"):
                continue
            if best is None or len(mount_point) >= len(best.mount_point):
                best = Mount(mount_point, fields[separator + 1], tuple(fields[separator + 3].split(",")))
    if best is None:
        raise MemoryBackingError(f"{path}: no mount holds it (/proc/self/mountinfo)")
    return best


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def huge_tmpfs_problem(directory: str) -> str | None:
    """Why `directory` cannot hold "shmem-huge" RAM, or None if it can."""
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    mount = mount_of(directory)
    if mount.fstype != TMPFS:
        return f"{directory} is on a {mount.fstype} file system (mounted at {mount.mount_point}), not a tmpfs"
    huge = mount.option("huge")
    if huge not in HUGE_TMPFS_MODES:
        return (
            f"{directory} is on a tmpfs at {mount.mount_point} mounted with huge={huge or 'never'}, which "
            f"gives no huge pages (needed: huge={' or huge='.join(HUGE_TMPFS_MODES)})"
        )
    return None


@dataclass(frozen=True)
class HugetlbPool:
    """/proc/meminfo's view of the default hugetlb pool."""

    page_size: int
    total: int
    free: int
    reserved: int  # promised to mappings, not yet faulted: not free for a new VM

    @property
    def available(self) -> int:
        return max(0, self.free - self.reserved)

    def shortfall(self, size: int, name: str) -> str:
        needed = size // self.page_size
        return (
            f"hugetlbfs backing for {name}: {size >> 20} MiB needs {needed} huge pages of "
            f"{self.page_size >> 10} KiB, only {self.available} are free (HugePages_Total {self.total}, "
            f"HugePages_Free {self.free}, HugePages_Rsvd {self.reserved} in /proc/meminfo); reserve "
            f"{needed - self.available} more: echo {self.total + needed - self.available} > /proc/sys/vm/nr_hugepages"
        )


def hugetlb_pool() -> HugetlbPool:
    values: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as file:
        for line in file:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return HugetlbPool(
        page_size=values.get("Hugepagesize", HUGE_PAGE_SIZE),
        total=values.get("HugePages_Total", 0),
        free=values.get("HugePages_Free", 0),
        reserved=values.get("HugePages_Rsvd", 0),
    )


def open_ram_file(backing: RamBacking, name: str, size: int) -> int:
    """A new RAM file of `size` bytes for `backing`, not linked anywhere; its fd (O_CLOEXEC)."""
    if backing.huge_pages and size % HUGE_PAGE_SIZE:
        raise MemoryBackingError(
            f"memory {size} bytes: backing {backing.kind!r} needs a multiple of {HUGE_PAGE_SIZE >> 20} MiB"
        )
    if backing.kind == "memfd":
        fd = os.memfd_create(RESERVE_FILE_NAME if backing.reserve is not None else name, os.MFD_CLOEXEC)
    elif backing.kind == "shmem-huge":
        problem = huge_tmpfs_problem(backing.directory)
        if problem:
            raise MemoryBackingError(f"shmem-huge backing for {name}: {problem}")
        try:
            fd = os.open(backing.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise MemoryBackingError(
                f"shmem-huge backing for {name}: cannot create a file in {backing.directory}: {err.strerror}"
            ) from None
    else:
        pool = hugetlb_pool()
        if size > pool.available * pool.page_size:
            raise MemoryBackingError(pool.shortfall(size, name))
        fd = os.memfd_create(name, os.MFD_CLOEXEC | MFD_HUGETLB)
    try:
        os.ftruncate(fd, size)
        if backing.kind == "hugetlbfs":
            _allocate_hugetlb(fd, size, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _allocate_hugetlb(fd: int, size: int, name: str) -> None:
    # Taking every page now turns a pool emptied since the check (another VM, another process)
    # into ENOSPC here, instead of a SIGBUS when a vCPU or the daemon first touches the page.
    if _libc.fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSPC:
            raise MemoryBackingError(hugetlb_pool().shortfall(size, name) + " (the pool shrank since the check)")
        raise MemoryBackingError(f"hugetlbfs backing for {name}: fallocate failed: {os.strerror(err)}")
