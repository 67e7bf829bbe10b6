"""Guest RAM on each backing (memfd, shmem-huge, hugetlbfs): the same RAM file contract, the
errors that name what is missing, and dirty tracking that stays at 4 KiB on real KVM.

The huge-page tmpfs is mounted by the test (root). Huge pages for hugetlbfs are reserved through
/proc/sys/vm/nr_hugepages and the old value restored; those tests skip only when the kernel
cannot reserve a single huge page (no hugetlb support, or no memory for one), as they then have
nothing to run on.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from helpers import huge_tmpfs, hugetlb_free, hugetlb_pool, tmpfs, vcpus_alive, wait_for
from migrated.guests.x86_64.boot import load_workload
from migrated.guests.workload import WorkloadParams
from migrated.kvm.arch import create_vm
from migrated.kvm.backing import HUGE_PAGE_SIZE, MemoryBackingError, RamBacking
from migrated.kvm.memory import PAGE_SIZE, GuestMemory
from migrated.kvm.system import Kvm
from migrated.kvm.vm import VmConfig
from migrated.pagehash import memory_digest

MIB = 1 << 20
SIZE = 16 * MIB
BACKINGS = ("memfd", "shmem-huge", "hugetlbfs")


@contextmanager
def backing_for(kind: str, tmp_path: Path, pages: int = SIZE // HUGE_PAGE_SIZE) -> Iterator[RamBacking]:
    """A usable `kind` backing: a huge tmpfs mounted, or `pages` huge pages reserved."""
    if kind == "memfd":
        yield RamBacking("memfd")
    elif kind == "shmem-huge":
        with huge_tmpfs(tmp_path / "ram") as directory:
            yield RamBacking("shmem-huge", str(directory))
    else:
        with hugetlb_pool(pages) as free:
            if free == 0:
                pytest.skip("the kernel reserved no huge page (nr_hugepages): nothing to back hugetlbfs RAM")
            assert free >= pages, f"only {free} of {pages} huge pages could be reserved"
            yield RamBacking("hugetlbfs")


def _page_size_kib(address: int) -> tuple[int, int]:
    """(KernelPageSize, ShmemPmdMapped + FilePmdMapped) in KiB of our mapping at `address`."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{address:x}-"))
    fields: dict[str, int] = {}
    for line in lines[start + 1 :]:
        if "-" in line.split()[0]:
            break  # the next mapping
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0])
    return fields["KernelPageSize"], fields.get("ShmemPmdMapped", 0) + fields.get("FilePmdMapped", 0)


@pytest.mark.parametrize("kind", BACKINGS)
def test_sparse_writes_read_back_through_mapping_and_file(kind: str, tmp_path: Path) -> None:
    with backing_for(kind, tmp_path) as backing:
        memory = GuestMemory.flat(SIZE, backing=backing)
        try:
            region = memory.regions[0]
            assert memory.backing.kind == kind
            memory.write(5 * MIB + 3 * PAGE_SIZE, b"migrated" * 512)  # one page, in the 3rd 2 MiB page
            memory.write(SIZE - 10, b"end of ram")  # straddles nothing: the last page
            fd, offset = memory.fd_for(region), memory.file_offset(region)
            assert os.pread(fd, 8, offset + 5 * MIB + 3 * PAGE_SIZE) == b"migrated"
            assert os.pread(fd, 10, offset + SIZE - 10) == b"end of ram"
            extents = memory.data_extents(region)
            written = [(5 * MIB) // PAGE_SIZE + 3, SIZE // PAGE_SIZE - 1]
            assert all(any(first <= page < end for first, end in extents) for page in written), extents
            if kind == "memfd":
                assert extents == [(written[0], written[0] + 1), (written[1], written[1] + 1)]
                assert memory.allocated_bytes() == 2 * PAGE_SIZE
            elif kind == "shmem-huge":  # whole 2 MiB pages: still sparse
                per_huge = HUGE_PAGE_SIZE // PAGE_SIZE
                assert extents == [(2 * per_huge, 3 * per_huge), (7 * per_huge, 8 * per_huge)]
                assert memory.allocated_bytes() == 2 * HUGE_PAGE_SIZE
                assert _page_size_kib(memory.address)[1] >= 2 * HUGE_PAGE_SIZE // 1024
            else:  # hugetlbfs: all of it allocated at creation, one extent
                assert extents == [(0, SIZE // PAGE_SIZE)]
                assert _page_size_kib(memory.address)[0] == HUGE_PAGE_SIZE // 1024
        finally:
            memory.close()


@pytest.mark.parametrize("kind", BACKINGS)
def test_digest_is_the_same_whatever_holds_the_ram(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    pages = rng.choice(SIZE // PAGE_SIZE, 300, replace=False)
    data = rng.integers(0, 256, (pages.size, PAGE_SIZE), dtype=np.uint8)
    reference = GuestMemory.flat(SIZE)
    with backing_for(kind, tmp_path) as backing:
        memory = GuestMemory.flat(SIZE, backing=backing)
        try:
            for mem in (reference, memory):
                for page, content in zip(pages.tolist(), data):
                    mem.write(page * PAGE_SIZE, content)
            assert memory_digest(memory).sha256 == memory_digest(reference).sha256
            memory.write(int(pages[0]) * PAGE_SIZE, b"\1")
            assert memory_digest(memory).sha256 != memory_digest(reference).sha256
        finally:
            memory.close()
            reference.close()


@pytest.mark.parametrize("kind", BACKINGS)
def test_writable_by_fd_says_whether_pwrite_works(kind: str, tmp_path: Path) -> None:
    """The data plane asks `backing.writable_by_fd` before it pwritev()s into the RAM file."""
    with backing_for(kind, tmp_path) as backing:
        memory = GuestMemory.flat(SIZE, backing=backing)
        try:
            region = memory.regions[0]
            fd = memory.fd_for(region)
            if memory.backing.writable_by_fd:
                assert os.pwrite(fd, b"pwritten", memory.file_offset(region) + 3 * MIB) == 8
                assert memory.read(3 * MIB, 8).tobytes() == b"pwritten"
            else:
                with pytest.raises(OSError) as raised:
                    os.pwrite(fd, b"pwritten", 0)
                assert raised.value.errno == errno.EINVAL
        finally:
            memory.close()


def test_fd_for_refuses_a_region_of_another_vm() -> None:
    memory, other = GuestMemory.flat(2 * MIB), GuestMemory.flat(4 * MIB)
    try:
        with pytest.raises(ValueError, match="not one of this VM's"):
            memory.fd_for(other.regions[0])
    finally:
        memory.close()
        other.close()


def test_shmem_huge_on_a_tmpfs_without_huge_pages_names_the_mount_option(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "plain", "64m") as directory:
        with pytest.raises(MemoryBackingError, match=r"huge=never, which gives no huge pages"):
            GuestMemory.flat(SIZE, backing=RamBacking("shmem-huge", str(directory)))


def test_shmem_huge_on_another_file_system_names_it(tmp_path: Path) -> None:
    directory = Path("/proc/self")  # procfs: certainly not a tmpfs
    with pytest.raises(MemoryBackingError, match=r"on a proc file system .*not a tmpfs"):
        GuestMemory.flat(SIZE, backing=RamBacking("shmem-huge", str(directory)))


def test_shmem_huge_leaves_no_file_behind(tmp_path: Path) -> None:
    with huge_tmpfs(tmp_path / "ram") as directory:
        memory = GuestMemory.flat(SIZE, backing=RamBacking("shmem-huge", str(directory)))
        memory.write(0, b"x" * PAGE_SIZE)
        assert list(directory.iterdir()) == []  # O_TMPFILE: never named, so a crash leaves nothing
        memory.close()


@pytest.mark.parametrize("kind", ["shmem-huge", "hugetlbfs"])
def test_huge_backings_need_a_multiple_of_2_mib(kind: str, tmp_path: Path) -> None:
    with huge_tmpfs(tmp_path / "ram") as directory:
        with pytest.raises(MemoryBackingError, match="needs a multiple of 2 MiB"):
            GuestMemory.flat(SIZE + PAGE_SIZE, backing=RamBacking(kind, str(directory)))  # type: ignore[arg-type]


def test_hugetlbfs_shortfall_is_an_error_naming_it_before_any_page_is_touched() -> None:
    free = hugetlb_free()
    size = (free + 3) * HUGE_PAGE_SIZE
    with pytest.raises(MemoryBackingError) as raised:
        GuestMemory.flat(size, name="big-ram", backing=RamBacking("hugetlbfs"))
    message = str(raised.value)
    assert f"needs {free + 3} huge pages of 2048 KiB, only {free} are free" in message
    assert "/proc/sys/vm/nr_hugepages" in message and "reserve 3 more" in message
    assert hugetlb_free() == free  # nothing taken


def test_unknown_backing_names_the_choices() -> None:
    with pytest.raises(MemoryBackingError, match="allowed are memfd, shmem-huge, hugetlbfs"):
        RamBacking("tmpfs")  # type: ignore[arg-type]


@pytest.mark.kvm
@pytest.mark.parametrize("kind", ["shmem-huge", "hugetlbfs"])
def test_ring_reports_4k_pages_over_huge_page_ram(kind: str, tmp_path: Path) -> None:
    """The guest rewrites 1 MiB (256 pages) inside one 2 MiB host page, pass after pass: the
    ring names exactly those 256 pages each pass, none of the other 256 of that huge page (KVM
    maps a dirty-logged memslot with 4 KiB pages whatever backs it)."""
    memory_bytes = 32 * MIB
    with backing_for(kind, tmp_path, pages=memory_bytes // HUGE_PAGE_SIZE) as backing:
        config = VmConfig(memory_bytes=memory_bytes, dirty_tracking="ring", memory_backing=backing)
        with Kvm.open() as kvm, create_vm(kvm, config) as vm:
            assert vm.memory is not None and vm.tracker is not None
            guest = load_workload(vm, WorkloadParams(vcpus=1, working_set_bytes=1 * MIB, mode="passes"))
            ws_first, ws_end = guest.layout.ws_base // PAGE_SIZE, guest.layout.ws_end // PAGE_SIZE
            huge_first = guest.layout.ws_base // HUGE_PAGE_SIZE * (HUGE_PAGE_SIZE // PAGE_SIZE)
            assert huge_first == ws_first and ws_end - ws_first == 256  # the layout this test relies on
            vm.tracker.collect()
            vm.start()
            for _ in range(4):
                target = guest.request_pass(vm.write_guest, vm.ram)
                wait_for(
                    lambda done=target: min(guest.passes_done(vm.ram)) >= done,
                    30,
                    "a pass",
                    healthy=vcpus_alive(vm.vcpus),
                )
                pages = np.sort(vm.tracker.collect().by_slot[0])
                in_huge_page = pages[(pages >= huge_first) & (pages < huge_first + HUGE_PAGE_SIZE // PAGE_SIZE)]
                np.testing.assert_array_equal(in_huge_page, np.arange(ws_first, ws_end, dtype=np.uint64))
            # The precondition, checked rather than assumed: the working set sits on huge pages.
            kernel_kib, pmd_kib = _page_size_kib(vm.memory.address)
            assert kernel_kib == 2048 or pmd_kib >= 2048, (kernel_kib, pmd_kib)
            vm.pause()
            assert guest.verify(vm.ram).ok


@pytest.mark.parametrize("kind", BACKINGS)
def test_a_sparse_read_returns_the_holes_as_zeros_without_allocating_them(kind: str, tmp_path: Path) -> None:
    """`read_sparse` (what `vm dump` reads) leaves a sparse RAM file as sparse as it was: a read
    through the mapping would allocate every hole it crossed."""
    with backing_for(kind, tmp_path) as backing:
        memory = GuestMemory.flat(SIZE, backing=backing)
        try:
            memory.write(5 * MIB + 3 * PAGE_SIZE, b"migrated" * 512)
            memory.write(SIZE - 10, b"end of ram")
            allocated = memory.allocated_bytes()
            whole = memory.read_sparse(0, SIZE)
            assert bytes(whole[5 * MIB + 3 * PAGE_SIZE : 5 * MIB + 4 * PAGE_SIZE]) == b"migrated" * 512
            assert bytes(whole[SIZE - 10 :]) == b"end of ram"
            written = {5 * MIB // PAGE_SIZE + 3, SIZE // PAGE_SIZE - 1}
            other = np.ones(SIZE // PAGE_SIZE, bool)
            other[list(written)] = False
            assert not whole.reshape(-1, PAGE_SIZE)[other].any()
            part = memory.read_sparse(5 * MIB + 3 * PAGE_SIZE + 100, 200)
            assert bytes(part) == (b"migrated" * 512)[100:300]
            assert memory.data_ranges(5 * MIB + 3 * PAGE_SIZE + 100, 200) == [(0, 200)]
            assert memory.allocated_bytes() == allocated, "a sparse read allocated RAM"
            np.testing.assert_array_equal(whole, memory.read(0, SIZE))  # through the mapping, last
        finally:
            memory.close()
