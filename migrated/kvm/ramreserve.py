"""The RAM reserve: the RAM files of VMs that left this daemon, zeroed and kept for the next VM it
receives or creates (`vm.ram_reserve_mib`, `vm.ram_reserve_hold_s`).

Why (issue 12). A fresh memfd page is allocated and zeroed by the kernel when it is first written:
on a target, inside the incoming copy's `pwrite`, while the source waits for the pages to land. On
this nested host the outer host also takes back memory that was freed a few seconds ago and must
back it again on that first write: 12 MiB written into a fresh 150 MiB memfd cost 3.7 ms of CPU
right after a VM's 150 MiB were freed, 5.8 ms 1.5 s later, 13 ms 3 s later (3 ms into pages that
exist). A file kept here keeps its pages, so the next VM's pages land in memory that is already
there, and the zeroing is done here, on the reserve's own thread, after the VM left, not inside
the next migration. Production VMMs preallocate for the same reason (QEMU's `prealloc=on`).

Rules of this file:

- A file becomes takeable only zeroed: every allocated extent of it (SEEK_DATA/SEEK_HOLE) written
  with zeros on the reserve's thread before `take` can see it, so no VM ever reads another's
  bytes. Holes stay holes (a hole reads as zero and costs nothing).
- Only memfd RAM (the default backing): a huge-page file lives in its tmpfs directory, and a
  hugetlbfs file holds its pages from the pool whatever happens.
- Bounded, as a cache: the kept files' allocated bytes together stay within the limit (the oldest
  closed first); a file kept longer than the hold time is closed; a file is not kept at all while
  the host has less than 1/LOW_MEMORY_FRACTION of its RAM available (MemAvailable), since shmem
  pages cannot be reclaimed by the kernel and a VM's RAM is worth more than a faster next copy.
- `give` (any thread) takes ownership of the fd and never waits for the zeroing; `take` (any
  thread) never waits either: a file still being zeroed is not offered.
- `close` (the daemon stops): the thread ends (a zeroing under way stops between chunks) and every
  fd is closed.
- No logging here (the kvm layer returns values): the daemon passes `report`, called with an event
  name and its fields, from the reserve's thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .extents import allocated_ranges
from .threadnames import name_this_thread

MIB = 1 << 20
ZERO_CHUNK = 1 * MIB  # one pwrite of zeros: the GIL is released for each, and a stop is seen between them
LOW_MEMORY_FRACTION = 8
# A kept file serves a VM expected to hold `expected` bytes of RAM only up to expected + its
# slack: a kept file's pages stay with the VM that takes it (zeros, until the VM writes them),
# and a sparse VM should not hold 2 GiB of another's zeroed pages for its whole life.
SLACK_BYTES = 16 * MIB
SLACK_FRACTION = 4  # ... or a quarter of `expected`, whichever is more
MEMINFO = Path("/proc/meminfo")
FILE_NAME = "migrated-ram"  # every memfd a reserve may serve: a kept file outlives the VM it was made for

Report = Callable[..., None]


@dataclass(frozen=True, slots=True)
class ReserveLimits:
    limit_bytes: int  # 0: the reserve keeps nothing
    hold_s: float


@dataclass(slots=True)
class _Kept:
    fd: int
    allocated: int
    size: int
    since: float


@dataclass(frozen=True, slots=True)
class ReserveClaim:
    """A reserve as one VM's RAM sees it (RamBacking.reserve): where its file comes from, with
    the VM's expected size, and where it goes when the VM is gone."""

    reserve: RamReserve
    expected_bytes: int

    def take(self, size: int) -> int | None:
        return self.reserve.take(size, self.expected_bytes)

    def give(self, fd: int) -> None:
        self.reserve.give(fd)


def _no_report(event: str, **fields: Any) -> None:
    pass


def memory_available_fraction(meminfo: Path = MEMINFO) -> float:
    """MemAvailable / MemTotal of this host, from /proc/meminfo."""
    values: dict[str, int] = {}
    with open(meminfo) as file:
        for line in file:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0])
    return values.get("MemAvailable", 0) / max(1, values.get("MemTotal", 1))


class RamReserve:
    def __init__(
        self,
        limits: Callable[[], ReserveLimits],
        *,
        report: Report = _no_report,
        clock: Callable[[], float] = time.monotonic,
        available_fraction: Callable[[], float] = memory_available_fraction,
    ) -> None:
        self._limits = limits  # read at every decision: a reload applies to the next one
        self.report = report
        self._clock = clock
        self._available_fraction = available_fraction
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._to_zero: list[int] = []
        self._kept: list[_Kept] = []  # zeroed, oldest first
        self._zeroing = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self.taken = 0
        self.misses = 0  # a take that found nothing
        self.kept = 0
        self.released: Counter[str] = Counter()  # reason -> files closed instead of kept

    # ---- the VMs' side ---------------------------------------------------------------------

    def claim(self, expected_bytes: int = 0) -> ReserveClaim:
        """What a new VM's RAM comes from: this reserve, for a VM expected to hold about
        `expected_bytes` of RAM (an incoming VM: what its source holds; a new one: 0)."""
        return ReserveClaim(self, expected_bytes)

    def take(self, size: int, expected_bytes: int = 0) -> int | None:
        """A zeroed RAM file of `size` bytes, made from a kept one of at most that size whose
        allocated pages fit a VM expected to hold `expected_bytes` (see SLACK_BYTES), or None."""
        fits = expected_bytes + max(SLACK_BYTES, expected_bytes // SLACK_FRACTION)
        with self._lock:
            self._expire_locked()
            # The newest that fits: the most recently used pages, the least likely taken back by
            # a hypervisor under this host. Never one larger than `size`: shrinking it would free
            # pages, inside the caller (a target's setup, on the event loop).
            index = next(
                (
                    i
                    for i in reversed(range(len(self._kept)))
                    if self._kept[i].allocated <= fits and self._kept[i].size <= size
                ),
                None,
            )
            if index is None:
                self.misses += 1
                return None
            kept = self._kept.pop(index)
            self.taken += 1
        try:
            os.ftruncate(kept.fd, size)  # growing adds a hole, which reads as zero
        except OSError:
            os.close(kept.fd)
            return None
        return kept.fd

    def give(self, fd: int) -> None:
        """The RAM file of a VM that is gone (unmapped): zeroed and kept, or closed. Ours now."""
        with self._lock:
            if self._closing or self._limits().limit_bytes <= 0:
                self._release_locked(fd, "off")
                return
            self._to_zero.append(fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ram-reserve", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    # ---- status and shutdown ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        limits = self._limits()
        with self._lock:
            return {
                "limit_mib": limits.limit_bytes // MIB,
                "hold_s": limits.hold_s,
                "files": len(self._kept),
                "kept_mib": round(sum(k.allocated for k in self._kept) / MIB, 1),
                "zeroing": len(self._to_zero) + (1 if self._zeroing else 0),
                "kept": self.kept,
                "taken": self.taken,
                "misses": self.misses,
                "released": dict(self.released),
            }

    def trim(self) -> None:
        """Apply the limits now (a reload lowered them, or turned the reserve off): the oldest
        files past the limit and those held long enough are closed at once."""
        limit = self._limits().limit_bytes
        with self._lock:
            self._expire_locked()
            self._within_limit_locked(limit)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every file given so far is zeroed (kept or closed); False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: not self._to_zero and not self._zeroing, timeout)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            for fd in self._to_zero:
                self._release_locked(fd, "stopping")
            self._to_zero.clear()
            for kept in self._kept:
                self._release_locked(kept.fd, "stopping")
            self._kept.clear()

    # ---- the reserve's thread ----------------------------------------------------------------

    def _run(self) -> None:
        name_this_thread("ram-reserve")
        while True:
            with self._lock:
                while not self._to_zero and not self._closing:
                    self._changed.wait(self._until_next_expiry_locked())
                    self._expire_locked()
                if self._closing:
                    return
                fd = self._to_zero.pop(0)
                self._zeroing = True
            started = time.perf_counter()
            try:
                allocated = self._zero(fd)
            except Exception as err:  # an OSError, or a bug: the file is closed, the thread goes on
                allocated = None
                self.report("ram_reserve_zeroing_failed", error=str(err) or type(err).__name__)
            zero_ms = round((time.perf_counter() - started) * 1e3, 2)
            with self._lock:
                self._zeroing = False
                kept = self._keep_locked(fd, allocated)
                files = len(self._kept)
                self._changed.notify_all()
            if kept:
                self.report("ram_reserve_kept", mib=round((allocated or 0) / MIB, 1), zero_ms=zero_ms, files=files)

    def _zero(self, fd: int) -> int | None:
        """Zeros over every allocated extent; the allocated bytes after, or None if stopped."""
        zeros = memoryview(bytes(ZERO_CHUNK))
        for data, hole in allocated_ranges(fd, 0, os.fstat(fd).st_size):
            while data < hole:
                if self._closing:
                    return None
                data += os.pwrite(fd, zeros[: min(ZERO_CHUNK, hole - data)], data)
        return os.fstat(fd).st_blocks * 512

    def _keep_locked(self, fd: int, allocated: int | None) -> bool:
        """Keep the zeroed file, or close it (and why); True if kept."""
        limits = self._limits()
        if allocated is None:
            self._release_locked(fd, "stopping" if self._closing else "zeroing_failed")
        elif allocated == 0:
            self._release_locked(fd, "empty")  # no pages to keep warm
        elif allocated > limits.limit_bytes:
            self._release_locked(fd, "larger_than_limit")
        elif self._available_fraction() < 1 / LOW_MEMORY_FRACTION:
            self._release_locked(fd, "low_memory")
        else:
            self._kept.append(_Kept(fd, allocated, os.fstat(fd).st_size, self._clock()))
            self.kept += 1
            self._within_limit_locked(limits.limit_bytes)
            return True  # the newest, within the limit: never the one the loop closes
        return False

    def _within_limit_locked(self, limit: int) -> None:
        """The oldest kept files closed until the rest hold at most `limit` bytes."""
        while self._kept and sum(k.allocated for k in self._kept) > limit:
            self._release_locked(self._kept.pop(0).fd, "over_limit")

    def _expire_locked(self) -> None:
        hold_s = self._limits().hold_s
        now = self._clock()
        while self._kept and now - self._kept[0].since >= hold_s:
            self._release_locked(self._kept.pop(0).fd, "held_long_enough")

    def _until_next_expiry_locked(self) -> float | None:
        if not self._kept:
            return None
        return max(0.0, self._kept[0].since + self._limits().hold_s - self._clock())

    def _release_locked(self, fd: int, reason: str) -> None:
        os.close(fd)
        self.released[reason] += 1
