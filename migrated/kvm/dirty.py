"""Dirty-page tracking: the per-vCPU dirty rings (DESIGN R1-R4b, R6-R7) or the bitmap (R8).

Both trackers answer `collect()`: every page dirtied since the last call, per memslot, deduplicated,
with tracking re-armed before it returns, so the caller may read those pages' contents right away
and a write that lands after the read shows up again in the next collection. The rest of the daemon
does not care which tracker is in use.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.ma  # noqa: F401  # imported by np.unique's first call otherwise: 8-9 ms (window.py)
import numpy.typing as npt

import ringreader

from . import uapi
from ._libc import ioctl
from .errors import DirtyRingLivelockError, KvmIoctlError
from .memory import GuestMemory, MemoryRegion

PageArray = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class DirtyPages:
    """Page offsets within each memslot, unique within each slot, in no particular order."""

    by_slot: dict[int, PageArray]

    @property
    def count(self) -> int:
        return sum(int(pages.size) for pages in self.by_slot.values())

    def union(self, other: DirtyPages) -> DirtyPages:
        slots = set(self.by_slot) | set(other.by_slot)
        empty = np.empty(0, np.uint64)
        return DirtyPages(
            {slot: np.union1d(self.by_slot.get(slot, empty), other.by_slot.get(slot, empty)) for slot in slots}
        )


@dataclass
class TrackerStats:
    mode: str
    collections: int = 0
    polls: int = 0
    entries_harvested: int = 0
    pages_collected: int = 0
    ring_full_exits: int = 0
    resets: int = 0
    last_collect_ms: float = 0.0
    backup_bitmap: str = "not in use"
    backup_bitmap_pages: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class DirtyTracker(Protocol):
    mode: str
    stats: TrackerStats
    # Distinct pages each vCPU's ring reported between the last two collect() calls, by vCPU
    # index: what a per-vCPU dirty limit measures (empty in bitmap mode, which cannot tell vCPUs
    # apart, and while `count_pages_by_vcpu` is off: the count costs a second dedup).
    pages_by_vcpu: dict[int, int]
    count_pages_by_vcpu: bool
    # R6.4 reads a backup bitmap (WITH_BITMAP): without one, R6.2's pages are all there is.
    uses_backup_bitmap: bool

    def collect(self) -> DirtyPages: ...

    def collect_is_small(self) -> bool:
        """A `collect()` now would take a fraction of a millisecond: a caller on an event loop
        may run it there rather than pay a worker thread's round trip."""
        ...

    def rearm(self) -> None: ...

    def poll(self) -> None: ...

    def collect_backup_bitmap(self) -> DirtyPages | None: ...


def _get_dirty_log(vm_fd: int, slot: int, bitmap: npt.NDArray[np.uint64]) -> None:
    log = uapi.kvm_dirty_log(slot=slot, dirty_bitmap=bitmap.ctypes.data)
    try:
        ioctl(vm_fd, uapi.KVM_GET_DIRTY_LOG, log)
    except OSError as err:
        raise KvmIoctlError(f"KVM_GET_DIRTY_LOG (slot {slot})", err) from err


def _bitmap_words(region: MemoryRegion) -> int:
    # api.rst: the bitmap has one bit per page, in longs, "rounded up to a multiple of 64 bits".
    return (region.pages + 63) // 64


def harvest_threshold(ring_entries: int) -> int:
    """Entries waiting in one ring that make a harvest due (RingTracker.HARVEST_FRACTION)."""
    return max(1, ring_entries // RingTracker.HARVEST_FRACTION)


def max_check_interval_s(ring_entries: int, interval_s: float) -> float:
    """The longest gap between two checks of rings of `ring_entries` (never below `interval_s`):
    RingTracker.MAX_CHECK_INTERVAL_S, or less where the room between the harvest threshold and
    the soft limit would not hold twice that gap's writes at RingTracker.PEAK_ENTRIES_PER_S."""
    room = ring_entries - RingTracker.SOFT_LIMIT_MARGIN - harvest_threshold(ring_entries)
    bound = room / RingTracker.PEAK_ENTRIES_PER_S / 2
    return max(interval_s, min(RingTracker.MAX_CHECK_INTERVAL_S, bound))


class RingTracker:
    """Harvests the per-vCPU dirty rings (R3) and resets them before anyone reads the pages.

    Harvests happen from three places, one at a time under a lock: `poll()` from the continuous
    harvester thread (R4: so that a ring rarely fills), `on_ring_full()` from a vCPU thread that
    exited with KVM_EXIT_DIRTY_RING_FULL, and `collect()` from the consumer. What the first two
    harvest is kept until the next `collect()`.
    """

    mode = "ring"
    # Harvested entries kept between collections are deduplicated once they exceed this many,
    # so a VM nobody collects from holds at most its distinct dirty pages, not every harvest.
    COMPACT_ENTRIES = 1 << 20
    # Consecutive ring-full exits of one vCPU with nothing in its ring before we call it a
    # livelock (HOST-NOTES.md: hundreds of thousands of such exits a second, no guest progress).
    LIVELOCK_EXITS = 1000
    # The harvester's wait (`wait_for_harvest`): harvest once a ring holds 1/8 of its entries,
    # or, this long after the last harvest, whatever waits. Nothing needs entries before a
    # collection (a migration's first step drops them: `rearm`), and every harvest re-protects
    # the pages: the slow harvest only keeps `vm show`'s counts moving.
    HARVEST_FRACTION = 8
    IDLE_HARVEST_S = 1.0
    # A ring that fills slowly or not at all is looked at less often than `interval_s`, up to
    # this far apart (rr_wait_dirty paces the checks by how fast the rings fill): each check
    # wakes the harvester thread, ~1.5% of a core per VM at 1 kHz on this nested host.
    MAX_CHECK_INTERVAL_S = 0.008
    # What bounds that gap: a ring's room above the threshold and below its soft limit must hold
    # the longest gap's writes at the fastest pace measured here (HOST-NOTES: ~600 k entries/s
    # per vCPU under PVM's emulator), twice.
    PEAK_ENTRIES_PER_S = 600_000
    # The soft limit is this far below a ring's size (api.rst: 64 entries reserved, 512 more
    # with Intel PML); counted whole whatever the CPU, as the safe side.
    SOFT_LIMIT_MARGIN = 64 + 512

    def __init__(
        self,
        vm_fd: int,
        memory: GuestMemory,
        ring_entries: int,
        with_bitmap: bool,
        with_bitmap_reason: str,
    ) -> None:
        self._vm_fd = vm_fd
        self._memory = memory
        self._entries = ring_entries
        self._with_bitmap = with_bitmap
        # vcpu -> (the mmapped ring as a writable buffer, [fetch index])
        self._rings: dict[int, tuple[ringreader.RingBuffer, list[int]]] = {}
        self._lock = threading.Lock()
        self._waiter: ringreader.RingWaiter | None = None
        self._slot_ids = [r.slot for r in memory.regions]
        self._dedup = ringreader.DirtyDedup({r.slot: r.pages for r in memory.regions})
        self._out_slot = np.empty(ring_entries, np.uint32)
        self._out_offset = np.empty(ring_entries, np.uint64)
        self._pending_slot: list[npt.NDArray[np.uint32]] = []
        self._pending_offset: list[PageArray] = []
        self._pending_vcpu: list[int] = []  # the vCPU of each pending chunk; -1: mixed or none
        self._pending_entries = 0
        self._compacted_entries = 0
        self._empty_full_exits: dict[int, int] = {}
        self._vcpu_pages: dict[int, int] = {}  # since the last collect(), by vCPU
        self.pages_by_vcpu: dict[int, int] = {}
        self.count_pages_by_vcpu = False
        self.stats = TrackerStats(mode="ring", backup_bitmap=with_bitmap_reason)
        self.uses_backup_bitmap = with_bitmap
        self._backup_bitmaps = (
            {r.slot: np.zeros(_bitmap_words(r), np.uint64) for r in memory.regions} if with_bitmap else {}
        )

    def add_ring(self, vcpu_index: int, ring: ringreader.RingBuffer) -> None:
        """Register a vCPU's mmapped ring (a writable buffer of ring_entries * 16 bytes), before
        the harvester starts (`wait_for_harvest` waits on the rings known then)."""
        with self._lock:
            self._rings[vcpu_index] = (ring, [0])
            if self._waiter is not None:
                self._waiter.release()
            self._waiter = ringreader.RingWaiter([r for r, _ in self._rings.values()], self._entries)
            self._waiter.fetch_indices[: len(self._rings)] = [fetch[0] for _, fetch in self._rings.values()]

    def remove_rings(self) -> None:
        """After the harvester has stopped (`stop_waiting`, then its thread joined)."""
        with self._lock:
            self._rings.clear()
            if self._waiter is not None:
                self._waiter.release()
                self._waiter = None

    def wait_for_harvest(self, interval_s: float) -> bool:
        """The continuous harvester's wait (R4), in the shim and without the GIL: checks of the
        rings, until one holds 1/HARVEST_FRACTION of its entries waiting, or IDLE_HARVEST_S has
        passed with any entry waiting, or `stop_waiting`. True when a `poll` is due. The checks
        come every `interval_s` while a ring fills fast, and up to `max_check_interval_s` apart
        while they fill slowly (rr_wait_dirty).

        Why not a harvest at every check, as before: a harvest re-protects the pages it found,
        and the guest's next write to each faults again (a page written all the time, a stack or
        a counter, came back after every harvest), and each harvest took the GIL from the event
        loop and the data plane. What bounds the wait is the ring: at most an eighth of it plus
        the longest gap's writes (HOST-NOTES: ~600 k entries/s per vCPU under emulation, 4,800 in
        8 ms) wait, far below the soft limit (entries minus 64, minus 512 with PML).
        Measured (bench/harvest_idle.py): see bench/RESULTS.md."""
        waiter = self._waiter
        if waiter is None or waiter.stopped:
            return False
        threshold = self.harvest_threshold
        checks, due = waiter.wait(threshold, interval_s, self.max_check_interval_s(interval_s), self.IDLE_HARVEST_S)
        self.stats.polls += checks
        return due

    @property
    def harvest_threshold(self) -> int:
        return harvest_threshold(self._entries)

    def max_check_interval_s(self, interval_s: float) -> float:
        return max_check_interval_s(self._entries, interval_s)

    def stop_waiting(self) -> None:
        """Ends the harvester's wait within 10 ms, and every later one."""
        waiter = self._waiter
        if waiter is not None:
            waiter.stop()

    def _harvest_locked(self) -> dict[int, int]:
        """R3: harvest every ring in order from its fetch index, then KVM_RESET_DIRTY_RINGS."""
        counts: dict[int, int] = {}
        total = 0
        waiter = self._waiter
        for position, (index, (ring, fetch)) in enumerate(self._rings.items()):
            harvested = 0
            while True:
                count, fetch[0] = ringreader.harvest(ring, self._entries, fetch[0], self._out_slot, self._out_offset)
                if count:
                    self._pending_slot.append(self._out_slot[:count].copy())
                    self._pending_offset.append(self._out_offset[:count].copy())
                    self._pending_vcpu.append(index)
                    harvested += count
                if count < self._entries:
                    break
            if waiter is not None:
                waiter.fetch_indices[position] = fetch[0]
            counts[index] = harvested
            total += harvested
        self._pending_entries += total
        if self._pending_entries - self._compacted_entries > self.COMPACT_ENTRIES:
            self._compact_locked()
        if total:
            # api.rst: the reset re-protects the harvested pages; it comes before their contents
            # are read, or a write between the read and the reset would be lost (R3).
            try:
                ioctl(self._vm_fd, uapi.KVM_RESET_DIRTY_RINGS, 0)
            except OSError as err:
                raise KvmIoctlError("KVM_RESET_DIRTY_RINGS", err) from err
            self.stats.resets += 1
            self.stats.entries_harvested += total
        return counts

    def _count_by_vcpu_locked(self) -> None:
        """Adds each vCPU's distinct pending pages to its count: one dedup (in the shim) per vCPU.

        Distinct, not entries: a page the guest rewrites all the time (its stack, a counter) is
        pushed again after every harvest's reset, hundreds of times a second, but sent once."""
        if not self.count_pages_by_vcpu:
            return
        chunks: dict[int, list[int]] = {}
        for position, vcpu in enumerate(self._pending_vcpu):
            if vcpu >= 0:
                chunks.setdefault(vcpu, []).append(position)
        for vcpu, positions in chunks.items():
            slots, _ = self._dedup.unique(
                np.concatenate([self._pending_slot[p] for p in positions]),
                np.concatenate([self._pending_offset[p] for p in positions]),
            )
            self._vcpu_pages[vcpu] = self._vcpu_pages.get(vcpu, 0) + int(slots.size)

    def _compact_locked(self) -> None:
        # The compacted chunk mixes vCPUs: their counts are taken first (a page dirtied on both
        # sides of a compaction counts twice, which overstates a rate, never hides one).
        self._count_by_vcpu_locked()
        slots, offsets = self._dedup.unique(np.concatenate(self._pending_slot), np.concatenate(self._pending_offset))
        self._pending_slot, self._pending_offset, self._pending_vcpu = [slots], [offsets], [-1]
        self._pending_entries = self._compacted_entries = int(slots.size)

    def poll(self) -> None:
        """A harvest by the harvester (its checks are counted in `stats.polls` by the wait)."""
        with self._lock:
            self._harvest_locked()

    def on_ring_full(self, vcpu_index: int) -> None:
        """A vCPU exited with KVM_EXIT_DIRTY_RING_FULL: harvest so it can re-enter (R4)."""
        with self._lock:
            self.stats.ring_full_exits += 1
            counts = self._harvest_locked()
            if counts.get(vcpu_index, 0):
                self._empty_full_exits[vcpu_index] = 0
                return
            empty = self._empty_full_exits.get(vcpu_index, 0) + 1
            self._empty_full_exits[vcpu_index] = empty
        if empty >= self.LIVELOCK_EXITS:
            raise DirtyRingLivelockError(
                f"vCPU {vcpu_index} exited {empty} times in a row with a full dirty ring that "
                "held nothing to harvest: the ring lost entries (KVM_EXIT_DIRTY_RING_FULL "
                "livelock); dirty tracking can no longer be trusted"
            )

    # Entries kept since the last collection below which `collect_is_small`: the rings hold at
    # most one harvest interval's more, and the shim dedups that many in well under 1 ms.
    SMALL_COLLECT_ENTRIES = 4096

    def collect_is_small(self) -> bool:
        # Read without the lock: a stale count only picks the thread or the loop.
        return self._pending_entries <= self.SMALL_COLLECT_ENTRIES

    def rearm(self) -> None:
        """Harvest and reset every ring (R3) and forget what was dirty: for a consumer about
        to read all of memory anyway (the bulk copy), to whom only later writes matter.

        Unlike `collect`, nothing is deduplicated: what the harvester kept since the last
        collection (up to COMPACT_ENTRIES entries) is dropped, not sorted for nobody.
        """
        started = time.perf_counter()
        with self._lock:
            self._drop_pending_locked()  # first, so that the harvest cannot compact what is dropped
            self._harvest_locked()
            self._drop_pending_locked()
            self._memory.take_daemon_dirty()
            self.stats.collections += 1
        self.stats.last_collect_ms = (time.perf_counter() - started) * 1e3

    def _drop_pending_locked(self) -> None:
        # The three lists run in step: a vCPU index left behind would point past the others.
        self._pending_slot, self._pending_offset, self._pending_vcpu = [], [], []
        self._vcpu_pages = {}
        self._pending_entries = self._compacted_entries = 0

    def collect(self) -> DirtyPages:
        started = time.perf_counter()
        with self._lock:
            self._harvest_locked()
            self._count_by_vcpu_locked()
            self.pages_by_vcpu, self._vcpu_pages = self._vcpu_pages, {}
            daemon = self._memory.take_daemon_dirty()
            slots = self._pending_slot
            offsets = self._pending_offset
            self._pending_slot, self._pending_offset, self._pending_vcpu = [], [], []
            self._pending_entries = self._compacted_entries = 0
            for slot, pages in daemon.items():
                if pages.size:
                    slots.append(np.full(pages.size, slot, np.uint32))
                    offsets.append(pages)
            if slots:
                all_slots, all_offsets = self._dedup.unique(np.concatenate(slots), np.concatenate(offsets))
            else:
                all_slots = np.empty(0, np.uint32)
                all_offsets = np.empty(0, np.uint64)
            self.stats.collections += 1
        result = _split_by_slot(all_slots, all_offsets, self._slot_ids)
        self.stats.pages_collected += result.count
        self.stats.last_collect_ms = (time.perf_counter() - started) * 1e3
        return result

    def collect_backup_bitmap(self) -> DirtyPages | None:
        """R6.4: KVM_GET_DIRTY_LOG of every memslot, the very last read of dirty state.

        None where WITH_BITMAP is not in use (R7: the kernel answers ENXIO, and nothing but the
        rings holds dirty state). Never KVM_CLEAR_DIRTY_LOG in this mode.
        """
        if not self._with_bitmap:
            return None
        by_slot: dict[int, PageArray] = {}
        for region in self._memory.regions:
            bitmap = self._backup_bitmaps[region.slot]
            _get_dirty_log(self._vm_fd, region.slot, bitmap)
            by_slot[region.slot] = ringreader.bitmap_to_pages(bitmap)
        pages = DirtyPages(by_slot)
        self.stats.backup_bitmap_pages += pages.count
        return pages


class BitmapTracker:
    """R8: KVM_GET_DIRTY_LOG per memslot (and KVM_CLEAR_DIRTY_LOG with manual protect).

    The reference that shows what the rings buy: its cost follows the guest's size.
    """

    mode = "bitmap"

    def __init__(self, vm_fd: int, memory: GuestMemory, manual_protect: bool) -> None:
        self._vm_fd = vm_fd
        self._memory = memory
        self._manual_protect = manual_protect
        self._lock = threading.Lock()
        self._bitmaps = {r.slot: np.zeros(_bitmap_words(r), np.uint64) for r in memory.regions}
        self.pages_by_vcpu: dict[int, int] = {}
        self.count_pages_by_vcpu = False  # nothing to count: the bitmap cannot tell vCPUs apart
        self.uses_backup_bitmap = False
        self.stats = TrackerStats(mode="bitmap", backup_bitmap="not applicable: bitmap mode tracks all in the bitmap")

    def poll(self) -> None:
        self.stats.polls += 1

    def rearm(self) -> None:
        """Re-protect every page and forget what was dirty (the bitmap has no cheaper way)."""
        self.collect()

    def collect_is_small(self) -> bool:
        return False  # KVM_GET_DIRTY_LOG reads a bitmap as large as guest RAM is

    def collect(self) -> DirtyPages:
        started = time.perf_counter()
        by_slot: dict[int, PageArray] = {}
        with self._lock:
            daemon = self._memory.take_daemon_dirty()
            for region in self._memory.regions:
                bitmap = self._bitmaps[region.slot]
                _get_dirty_log(self._vm_fd, region.slot, bitmap)
                if self._manual_protect:
                    self._clear(region, bitmap)
                pages = ringreader.bitmap_to_pages(bitmap)
                extra = daemon.get(region.slot)
                if extra is not None and extra.size:
                    pages = np.union1d(pages, extra)
                by_slot[region.slot] = pages
            self.stats.collections += 1
        result = DirtyPages(by_slot)
        self.stats.pages_collected += result.count
        self.stats.last_collect_ms = (time.perf_counter() - started) * 1e3
        return result

    def _clear(self, region: MemoryRegion, bitmap: npt.NDArray[np.uint64]) -> None:
        # api.rst: with manual protect, KVM_GET_DIRTY_LOG does not re-protect; the pages whose
        # bits are passed to KVM_CLEAR_DIRTY_LOG are, before we read them (the same rule as R3).
        clear = uapi.kvm_clear_dirty_log(
            slot=region.slot, num_pages=region.pages, first_page=0, dirty_bitmap=bitmap.ctypes.data
        )
        try:
            ioctl(self._vm_fd, uapi.KVM_CLEAR_DIRTY_LOG, clear)
        except OSError as err:
            raise KvmIoctlError(f"KVM_CLEAR_DIRTY_LOG (slot {region.slot})", err) from err

    def collect_backup_bitmap(self) -> DirtyPages | None:
        return None


def _split_by_slot(slots: npt.NDArray[np.uint32], offsets: PageArray, slot_ids: list[int]) -> DirtyPages:
    if len(slot_ids) == 1:
        return DirtyPages({slot_ids[0]: offsets})
    return DirtyPages({slot_id: offsets[slots == slot_id] for slot_id in slot_ids})
