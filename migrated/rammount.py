"""The huge-page tmpfs that "shmem-huge" guest RAM lives on, for a daemon that may mount it.

Configured (`vm.memory_backing_dir`): the operator's directory, used as it is, never mounted
here; it must already be a tmpfs with huge pages. Not configured: <state_dir>/ram. Under systemd
the unit mounts it (TemporaryFileSystem=..., the daemon there holds no CAP_SYS_ADMIN); a root
daemon elsewhere mounts a tmpfs there itself on first use (huge=within_size, mode 0700, no size
limit beyond the host's memory, as a memfd has none) and unmounts it when it exits. A private
mount namespace would be neater, but unshare(CLONE_NEWNS) is refused to a threaded process.
A mount left by a predecessor that died (SIGKILL gives no chance to unmount) is a huge-page
tmpfs already: it is used, the RAM files in it died with that process (they never had names), and
it is adopted, so this daemon unmounts it when it exits. It is recognised by its source name,
MOUNT_SOURCE, so an operator's or systemd's tmpfs at the same place is never taken for ours.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from .kvm.backing import MemoryBackingError, RamBacking, huge_tmpfs_problem
from .kvm.ramreserve import RamReserve

MNT_DETACH = 2
MOUNT_OPTIONS = "huge=within_size,mode=0700,size=0"  # size=0: no limit of its own
MOUNT_SOURCE = "migrated-ram"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


class RamDirectory:
    """Resolves a VM's backing choice into a `RamBacking`, mounting the default tmpfs once."""

    def __init__(self, configured: Path | None, state_dir: Path, reserve: RamReserve | None = None) -> None:
        self.path = configured if configured is not None else state_dir / "ram"
        self.reserve = reserve  # memfd RAM comes from it and goes back to it (kvm/ramreserve.py)
        self.ours = configured is None  # the daemon may mount (and must unmount) only its default
        self.mounted = False
        self._lock = threading.Lock()

    def backing(self, kind: str) -> RamBacking:
        """The backing for a new VM; MemoryBackingError naming the problem if it cannot be had."""
        if kind == "memfd":
            return RamBacking("memfd", reserve=None if self.reserve is None else self.reserve.claim())
        if kind != "shmem-huge":
            return RamBacking(kind)  # type: ignore[arg-type]  # RamBacking checks the name
        with self._lock:
            self._ensure()
        return RamBacking("shmem-huge", str(self.path))

    def _ensure(self) -> None:
        problem = huge_tmpfs_problem(str(self.path)) if self.path.is_dir() else f"{self.path} does not exist"
        if problem is None:
            if self.ours and not self.mounted and mount_source(self.path) == MOUNT_SOURCE:
                self.mounted = True  # a dead predecessor's: ours to unmount now
            return
        if not self.ours:
            raise MemoryBackingError(f"vm.memory_backing_dir: {problem}")
        self.path.mkdir(mode=0o700, exist_ok=True)
        if _libc.mount(MOUNT_SOURCE.encode(), bytes(self.path), b"tmpfs", 0, MOUNT_OPTIONS.encode()) != 0:
            err = ctypes.get_errno()
            raise MemoryBackingError(
                f"cannot mount a huge-page tmpfs at {self.path} ({problem}): mount: {os.strerror(err)}; "
                "mount one there (mount -t tmpfs -o huge=within_size,mode=0700 tmpfs PATH, or under systemd "
                "TemporaryFileSystem=PATH:huge=within_size,mode=0700) or set vm.memory_backing_dir"
            )
        self.mounted = True
        problem = huge_tmpfs_problem(str(self.path))
        if problem is not None:  # a kernel without shmem THP accepts huge= and ignores it
            self.unmount()
            raise MemoryBackingError(f"mounted a tmpfs at {self.path}, but {problem}")

    def unmount(self) -> None:
        """Detach the tmpfs this daemon mounted (RAM files still open keep it alive until closed)."""
        if self.mounted:
            _libc.umount2(bytes(self.path), MNT_DETACH)
            self.mounted = False


def mount_source(path: Path) -> str | None:
    """The source field of the mount at `path` (the last one, if several are stacked), or None."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            # "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS";
            # the kernel writes a space in a path as \040.
            fields, _, tail = line.partition(" - ")
            parts = fields.split()
            if len(parts) >= 5 and parts[4].replace("\\040", " ") == str(path):
                rest = tail.split()
                found = rest[1] if len(rest) >= 2 else None
    return found
