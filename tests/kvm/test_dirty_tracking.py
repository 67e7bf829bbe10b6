"""No page lost: the ring and bitmap trackers against the workload guest on real KVM.

Two independent checks. (1) The guest stamps each page's header with its generation; a header
that changed between two snapshots was written in between, and the tracker must report that page
in the collection of that interval or the next (see `_assert_covered` for why exactly those two).
(2) A mirror of guest RAM is updated from every collection (after the reset, as R3 requires);
once the VM is paused and collected a last time, the mirror must equal guest RAM byte for byte.
"""

from __future__ import annotations

import math
import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
import pytest

from helpers import wait_for
from migrated.guests.x86_64.boot import load_workload
from migrated.guests.workload import WorkloadGuest, WorkloadParams
from migrated.kvm.dirty import RingTracker, max_check_interval_s
from migrated.kvm.errors import DirtyRingLivelockError
from migrated.kvm.memory import PAGE_SIZE
from migrated.kvm.system import Kvm
from migrated.kvm.arch import create_vm
from migrated.kvm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm

MIB = 1 << 20
HEADER_GEN_WORD = 2  # generation | vcpu << 32 (migrated/guests/x86_64/abi.h)


@contextmanager
def workload_vm(
    vcpus: int,
    tracking: str,
    ring_bytes: int = 1 << 20,
    working_set: int = 32 * MIB,
    mode: str = "continuous",
    memory: int = 64 * MIB,
    harvest_interval_s: float | None = None,
) -> Iterator[tuple[Vm, WorkloadGuest]]:
    params = WorkloadParams(vcpus=vcpus, working_set_bytes=working_set, mode=mode)  # type: ignore[arg-type]
    config = VmConfig(
        memory_bytes=memory,
        vcpus=vcpus,
        dirty_tracking=tracking,  # type: ignore[arg-type]
        ring_bytes=ring_bytes,
    )
    if harvest_interval_s is not None:
        config = dataclasses.replace(config, harvest_interval_s=harvest_interval_s)
    with Kvm.open() as kvm, create_vm(kvm, config) as vm:
        guest = load_workload(vm, params)
        yield vm, guest
        vm.pause()
        assert [v.error for v in vm.vcpus] == [None] * vcpus
        assert vm.harvester_error is None


def _headers(vm: Vm, guest: WorkloadGuest) -> npt.NDArray[np.uint64]:
    layout = guest.layout
    words = vm.ram[layout.ws_base : layout.ws_end].view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    return words[:, HEADER_GEN_WORD].copy()


def _assert_covered(
    changed: npt.NDArray[np.uint64],
    before: npt.NDArray[np.uint64],
    now: npt.NDArray[np.uint64],
    interval: int,
) -> None:
    """Pages whose header changed between snapshots i-1 and i are in collection i-1 or i.

    Snapshot i is taken just before collection i. A page written after snapshot i-1 read it was
    either clean then (KVM pushes an entry at that write, harvested by collection i at the
    latest) or still dirty from an earlier write whose entry the reset of collection i-1 or a
    later poll re-protects after this write; either way collection i-1 or i reports it.
    """
    covered = np.union1d(before, now)
    missing = changed[~np.isin(changed, covered)]
    assert missing.size == 0, (
        f"interval {interval}: {missing.size} written pages missing from both collections, "
        f"e.g. pages {missing[:8].tolist()}"
    )


def _run_and_check(vm: Vm, guest: WorkloadGuest, harvests: int, until_ring_full: bool = False) -> int:
    assert vm.tracker is not None
    layout = guest.layout
    ws_first_page = layout.ws_base // PAGE_SIZE
    mirror = vm.ram.copy()
    vm.tracker.collect()  # the loader's own writes (R5), already in the mirror
    vm.start()
    if until_ring_full:
        # The precondition, forced rather than hoped for: nothing harvests until a ring fills.
        wait_for(
            lambda: vm.tracker is not None and vm.tracker.stats.ring_full_exits > 0,
            30.0,
            "a ring-full exit",
            interval=0.001,
        )
    snapshot = _headers(vm, guest)
    previous = np.empty(0, np.uint64)
    written_total = 0
    for interval in range(harvests):
        time.sleep(0.0005)
        now_snapshot = _headers(vm, guest)
        dirty = vm.tracker.collect().by_slot[0]
        pages = dirty.astype(np.intp)
        mirror.reshape(-1, PAGE_SIZE)[pages] = vm.ram.reshape(-1, PAGE_SIZE)[pages]
        changed = np.flatnonzero(now_snapshot != snapshot).astype(np.uint64) + ws_first_page
        written_total += changed.size
        _assert_covered(changed, previous, dirty, interval)
        snapshot, previous = now_snapshot, dirty
    vm.pause()
    final = vm.tracker.collect().by_slot[0].astype(np.intp)
    mirror.reshape(-1, PAGE_SIZE)[final] = vm.ram.reshape(-1, PAGE_SIZE)[final]
    differing = np.flatnonzero((mirror != vm.ram).reshape(-1, PAGE_SIZE).any(axis=1))
    assert differing.size == 0, f"{differing.size} pages differ from the mirror: {differing[:8]}"
    report = guest.verify(vm.ram)
    assert report.ok, report
    assert all(s.verify_errors == 0 for s in guest.status(vm.ram))
    return written_total


@pytest.mark.parametrize("vcpus", [1, 2])
def test_ring_loses_no_page_over_1000_harvests_at_full_speed(vcpus: int) -> None:
    with workload_vm(vcpus, "ring") as (vm, guest):
        written = _run_and_check(vm, guest, harvests=1000)
        assert written > 10_000, f"the guest wrote only {written} pages: not a full-speed test"
        assert isinstance(vm.tracker, RingTracker)
        assert vm.tracker.stats.collections >= 1000


def test_small_ring_fills_and_loses_nothing() -> None:
    """A 4 KiB ring (256 entries, soft limit 192) with no continuous harvester must fill
    (KVM_EXIT_DIRTY_RING_FULL); the vCPU's own harvest on that exit and the collections lose nothing."""
    with workload_vm(2, "ring", ring_bytes=4096, harvest_interval_s=3600.0) as (vm, guest):
        _run_and_check(vm, guest, harvests=1000, until_ring_full=True)
        assert vm.tracker is not None
        full_exits = vm.tracker.stats.ring_full_exits
        exits = sum(v.exits["dirty_ring_full"] for v in vm.vcpus)
        assert full_exits == exits > 0, (full_exits, exits)


def test_the_harvester_checks_every_interval_and_harvests_a_small_working_set_rarely() -> None:
    """A vCPU rewriting 1 MiB (256 pages) at full speed: between two harvests each page is
    pushed once, so its 65,536-entry ring never holds the eighth that makes a harvest due at
    once. The harvester then harvests only IDLE_HARVEST_S after the last, not at every check as
    it did: a harvest re-protects the pages, and each rewrite faulted again. And once the ring
    stops filling, its checks come max_check_interval_s apart, not every 1 ms interval. Counted,
    not timed: harvests (resets) against checks (polls): a wait makes at least IDLE_HARVEST_S /
    max_check_interval_s checks and, at the 1 ms pace, would make 1,000."""
    with workload_vm(1, "ring", working_set=1 * MIB) as (vm, guest):
        tracker = vm.tracker
        assert isinstance(tracker, RingTracker)
        vm.start()
        wait_for(lambda: tracker.stats.resets >= 2, what="two harvests by the harvester")
        resets = tracker.stats.resets
        checks = tracker.stats.polls  # read after the resets: a later read can only be larger
        interval_s = VmConfig.harvest_interval_s
        least = math.ceil(RingTracker.IDLE_HARVEST_S / tracker.max_check_interval_s(interval_s))
        at_every_interval = round(RingTracker.IDLE_HARVEST_S / interval_s)
        assert least * (resets - 1) <= checks < at_every_interval * (resets + 1) // 2, (resets, checks)
        assert tracker.stats.entries_harvested > 0
        assert tracker.stats.ring_full_exits == 0
        assert sum(status.pages_written for status in guest.status(vm.ram)) > 0


@pytest.mark.parametrize(
    ("ring_entries", "gap_ms"),
    [(65536, 8.0), (16384, 8.0), (8192, 5.49), (4096, 2.51), (1024, 1.0), (256, 1.0)],
)
def test_the_longest_gap_between_checks_leaves_room_in_the_ring(ring_entries: int, gap_ms: float) -> None:
    """8 ms at most; less where twice the gap's writes at the fastest pace measured here would
    not fit between the harvest threshold and the soft limit; never below the interval."""
    gap_s = max_check_interval_s(ring_entries, 0.001)
    assert gap_s == pytest.approx(gap_ms / 1000, abs=1e-5)
    room = ring_entries - 64 - 512 - ring_entries // RingTracker.HARVEST_FRACTION
    assert gap_s == 0.001 or 2 * gap_s * RingTracker.PEAK_ENTRIES_PER_S <= room
    assert max_check_interval_s(ring_entries, 0.05) == 0.05


def test_bitmap_loses_no_page_over_1000_harvests_at_full_speed() -> None:
    with workload_vm(2, "bitmap") as (vm, guest):
        assert _run_and_check(vm, guest, harvests=1000) > 10_000


def _pass_pages(vm: Vm, guest: WorkloadGuest, passes: int) -> list[npt.NDArray[np.uint64]]:
    assert vm.tracker is not None
    vm.tracker.collect()
    vm.start()
    found = []
    ws = (guest.layout.ws_base // PAGE_SIZE, guest.layout.ws_end // PAGE_SIZE)
    for _ in range(passes):
        target = guest.request_pass(vm.write_guest, vm.ram)
        deadline = time.monotonic() + 10
        while min(guest.passes_done(vm.ram)) < target:
            assert time.monotonic() < deadline, guest.status(vm.ram)
            time.sleep(0.001)
        pages = np.sort(vm.tracker.collect().by_slot[0])
        found.append(pages[(pages >= ws[0]) & (pages < ws[1])])
    return found


def test_bitmap_and_ring_find_the_same_pages_for_the_same_run() -> None:
    """Passes mode: every pass rewrites the same pages; both trackers must name exactly them."""
    results = {}
    for mode in ("ring", "bitmap"):
        with workload_vm(2, mode, working_set=8 * MIB, mode="passes") as (vm, guest):
            results[mode] = _pass_pages(vm, guest, passes=5)
            expected = np.arange(guest.layout.ws_base, guest.layout.ws_end, PAGE_SIZE) // PAGE_SIZE
    for ring_pages, bitmap_pages in zip(results["ring"], results["bitmap"]):
        np.testing.assert_array_equal(ring_pages, bitmap_pages)
        np.testing.assert_array_equal(ring_pages, expected.astype(np.uint64))


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_daemon_writes_are_collected(mode: str) -> None:
    """R5: KVM sees only guest writes; what the daemon writes is reported all the same."""
    with workload_vm(1, mode) as (vm, guest):
        assert vm.tracker is not None
        vm.tracker.collect()
        gpa = guest.layout.ws_end - 3 * PAGE_SIZE
        vm.write_guest(gpa + 100, b"x" * (PAGE_SIZE + 10))  # straddles two pages
        pages = vm.tracker.collect().by_slot[0]
        assert sorted(pages.tolist()) == [gpa // PAGE_SIZE, gpa // PAGE_SIZE + 1]
        assert vm.tracker.collect().count == 0


def test_ring_full_livelock_fails_loudly() -> None:
    """Ring-full exits with nothing to harvest, as PVM shows for emulated code, raise.

    The exits are delivered through the tracker's real handler on a real VM whose rings are
    empty: what a livelocked vCPU would make it see (HOST-NOTES.md).
    """
    with workload_vm(1, "ring") as (vm, _guest):
        tracker = vm.tracker
        assert isinstance(tracker, RingTracker)
        for _ in range(RingTracker.LIVELOCK_EXITS - 1):
            tracker.on_ring_full(0)
        with pytest.raises(DirtyRingLivelockError, match="livelock"):
            tracker.on_ring_full(0)


def _one_pass(vm: Vm, guest: WorkloadGuest) -> None:
    target = guest.request_pass(vm.write_guest, vm.ram)
    wait_for(lambda: min(guest.passes_done(vm.ram)) >= target, timeout=10, what=f"pass {target}")


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_rearm_forgets_what_was_dirty_and_tracks_what_follows(mode: str) -> None:
    """The source's first collection before the bulk copy only re-arms tracking: what was dirty
    before it is dropped (the bulk copy reads all memory), every write after it is reported."""
    with workload_vm(1, mode, working_set=8 * MIB, mode="passes") as (vm, guest):
        assert vm.tracker is not None
        ws = (guest.layout.ws_base // PAGE_SIZE, guest.layout.ws_end // PAGE_SIZE)
        expected = np.arange(ws[0], ws[1], dtype=np.uint64)

        def in_ws(pages: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
            pages = np.sort(pages)
            return pages[(pages >= ws[0]) & (pages < ws[1])]

        vm.tracker.collect()
        vm.start()
        _one_pass(vm, guest)
        vm.tracker.poll()  # ring: what the harvester takes is kept for the next collection
        vm.write_guest(guest.layout.ws_base, b"x")  # R5: the daemon's own marks as well
        vm.tracker.rearm()
        assert in_ws(vm.tracker.collect().by_slot[0]).size == 0
        _one_pass(vm, guest)
        np.testing.assert_array_equal(in_ws(vm.tracker.collect().by_slot[0]), expected)


def test_rearm_with_per_vcpu_counting_then_collect() -> None:
    """The dirty limit counts pages per vCPU from the rounds on, and the bulk copy's re-arm drops
    what was pending: the per-vCPU bookkeeping must be dropped with it (an index left behind
    failed the next collection with an IndexError), and the counts start again from the re-arm."""
    with workload_vm(1, "ring", working_set=8 * MIB, mode="passes") as (vm, guest):
        tracker = vm.tracker
        assert isinstance(tracker, RingTracker)
        tracker.count_pages_by_vcpu = True
        vm.start()
        _one_pass(vm, guest)
        tracker.poll()  # pending entries of vCPU 0, to be dropped by the re-arm
        tracker.rearm()
        tracker.collect()
        assert tracker.pages_by_vcpu.get(0, 0) < (8 * MIB) // PAGE_SIZE
        _one_pass(vm, guest)
        tracker.poll()
        tracker.collect()
        assert tracker.pages_by_vcpu.get(0, 0) >= (8 * MIB) // PAGE_SIZE
