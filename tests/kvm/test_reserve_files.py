"""The RAM reserve (migrated/kvm/ramreserve.py) on real memfds: a file comes back zeroed with its
pages, never with a byte of the VM before; its bounds (limit, hold time, low memory) hold; a
stopping reserve closes everything. No KVM needed: a reserve only holds files. The clock and the
host's available memory are passed in, so the hold time and the low-memory rule are tested
without waiting or filling the host."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from migrated.kvm.backing import RamBacking
from migrated.kvm.memory import PAGE_SIZE, GuestMemory
from migrated.kvm.ramreserve import FILE_NAME, MIB, RamReserve, ReserveLimits, memory_available_fraction


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reserve(
    limit_mib: int = 64, hold_s: float = 60.0, clock: Clock | None = None, available: float = 0.5
) -> RamReserve:
    return RamReserve(
        lambda: ReserveLimits(limit_mib * MIB, hold_s),
        clock=clock or Clock(),
        available_fraction=lambda: available,
    )


def ram_file(size: int, written: list[int]) -> int:
    """A memfd of `size` bytes with a non-zero page at each offset in `written`; holes elsewhere."""
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    for offset in written:
        os.pwrite(fd, bytes([0xA5]) * PAGE_SIZE, offset)
    return fd


def contents(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_a_given_file_comes_back_zeroed_with_its_pages_and_its_holes() -> None:
    size = 8 * MIB
    written = [0, 5 * PAGE_SIZE, 3 * MIB, 3 * MIB + PAGE_SIZE, size - PAGE_SIZE]
    fd = ram_file(size, written)
    before = allocated(fd)
    pool = reserve()
    pool.give(fd)
    assert pool.wait_idle(10)
    taken = pool.take(size)
    assert taken is not None
    try:
        assert contents(taken) == bytes(size), "zeroed, every byte"
        assert allocated(taken) == before == len(written) * PAGE_SIZE, "the same pages, no more"
        assert os.lseek(taken, 0, os.SEEK_HOLE) == PAGE_SIZE, "a hole stays a hole"
    finally:
        os.close(taken)
    assert pool.take(size) is None, "handed out once"
    assert pool.status()["taken"] == 1 and pool.status()["misses"] == 1


def test_a_taken_file_grows_to_the_size_asked_for_and_is_never_shrunk() -> None:
    """Growing adds a hole; a file larger than the VM is left for another (shrinking it would free
    its pages inside the caller: a target's setup, on the event loop)."""
    fd = ram_file(4 * MIB, [0, 3 * MIB])
    pool = reserve()
    pool.give(fd)
    assert pool.wait_idle(10)
    assert pool.take(2 * MIB) is None
    taken = pool.take(16 * MIB)
    assert taken == fd
    try:
        assert os.fstat(taken).st_size == 16 * MIB
        assert contents(taken) == bytes(16 * MIB)
        assert allocated(taken) == 2 * PAGE_SIZE
    finally:
        os.close(taken)


def test_a_reserve_of_zero_closes_what_it_is_given_at_once() -> None:
    fd = ram_file(MIB, [0])
    pool = reserve(limit_mib=0)
    pool.give(fd)
    assert is_closed(fd)
    assert pool.status()["released"] == {"off": 1} and pool.status()["files"] == 0


def test_the_kept_bytes_stay_within_the_limit_oldest_out_first() -> None:
    pool = reserve(limit_mib=3)
    first, second = (
        ram_file(4 * MIB, list(range(0, 2 * MIB, PAGE_SIZE))),
        ram_file(4 * MIB, list(range(0, 2 * MIB, PAGE_SIZE))),
    )
    too_large = ram_file(8 * MIB, list(range(0, 4 * MIB, PAGE_SIZE)))
    for fd in (first, second, too_large):
        pool.give(fd)
    assert pool.wait_idle(10)
    status = pool.status()
    assert status["files"] == 1 and status["kept_mib"] == 2.0, status
    assert status["released"] == {"over_limit": 1, "larger_than_limit": 1}, status
    assert is_closed(first) and is_closed(too_large)
    taken = pool.take(4 * MIB)
    assert taken == second
    os.close(taken)


def test_a_lower_limit_applies_at_once_when_trimmed() -> None:
    """A reload that lowers ram_reserve_mib (or sets 0) frees what is kept past it, oldest first,
    without waiting for the next VM."""
    limit = [8]
    pool = RamReserve(lambda: ReserveLimits(limit[0] * MIB, 60), clock=Clock(), available_fraction=lambda: 0.5)
    older, newer = ram_file(4 * MIB, list(range(0, 2 * MIB, PAGE_SIZE))), ram_file(4 * MIB, [0])
    for fd in (older, newer):
        pool.give(fd)
    assert pool.wait_idle(10)
    limit[0] = 1
    pool.trim()
    assert is_closed(older) and not is_closed(newer)
    limit[0] = 0
    pool.trim()
    assert is_closed(newer) and pool.status()["files"] == 0
    assert pool.status()["released"] == {"over_limit": 2}


def test_a_file_kept_past_the_hold_time_is_closed() -> None:
    clock = Clock()
    pool = reserve(hold_s=30, clock=clock)
    fd = ram_file(MIB, [0])
    pool.give(fd)
    assert pool.wait_idle(10)
    clock.now += 30
    assert pool.take(MIB) is None
    assert is_closed(fd)
    assert pool.status()["released"] == {"held_long_enough": 1}


def test_nothing_is_kept_while_the_host_is_short_of_memory() -> None:
    pool = reserve(available=0.05)
    fd = ram_file(MIB, [0])
    pool.give(fd)
    assert pool.wait_idle(10)
    assert is_closed(fd) and pool.status()["released"] == {"low_memory": 1}


def test_a_file_without_pages_is_not_kept() -> None:
    pool = reserve()
    fd = ram_file(MIB, [])
    pool.give(fd)
    assert pool.wait_idle(10)
    assert is_closed(fd) and pool.status()["released"] == {"empty": 1}


def test_the_reserve_thread_has_a_kernel_name() -> None:
    pool = reserve()
    pool.give(ram_file(MIB, [0]))
    assert pool.wait_idle(10)
    thread = pool._thread  # this reserve's own, not one another test left behind
    assert thread is not None and thread.native_id is not None
    assert Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip() == "ram-reserve"
    pool.close()


def test_closing_the_reserve_closes_every_file_and_takes_no_more() -> None:
    pool = reserve()
    files = [ram_file(MIB, [0]) for _ in range(3)]
    for fd in files:
        pool.give(fd)
    assert pool.wait_idle(10)
    pool.close()
    assert all(is_closed(fd) for fd in files)
    late = ram_file(MIB, [0])
    pool.give(late)
    assert is_closed(late), "a file given after close is closed, not kept"
    assert pool.take(MIB) is None


def test_guest_memory_goes_to_the_reserve_and_the_next_vm_reads_zeros(tmp_path: Path) -> None:
    """The path the daemon uses: RAM of the memfd backing with the daemon's reserve. The second
    VM's RAM is the first's file (its pages already there), and reads as zeros everywhere."""
    pool = reserve()
    backing = RamBacking("memfd", reserve=pool.claim())
    first = GuestMemory.flat(4 * MIB, "vm-a", backing)
    assert not first.from_reserve
    first.bytes[: 2 * MIB] = 0x5A  # what a guest wrote: through the mapping
    assert os.readlink(f"/proc/self/fd/{first.fd}") == f"/memfd:{FILE_NAME} (deleted)", "no VM's name on a shared file"
    first.close()
    assert pool.wait_idle(10)
    second = GuestMemory.flat(4 * MIB, "vm-b", backing)
    try:
        assert second.from_reserve
        assert second.allocated_bytes() == 2 * MIB
        assert int(np.count_nonzero(second.bytes)) == 0
    finally:
        second.close()
    pool.close()


def test_other_backings_never_use_the_reserve() -> None:
    pool = reserve()
    fd = ram_file(MIB, [0])
    pool.give(fd)
    assert pool.wait_idle(10)
    memory = GuestMemory.flat(MIB, "plain", RamBacking("memfd"))
    try:
        assert not memory.from_reserve
    finally:
        memory.close()
    assert pool.status()["files"] == 1
    pool.close()


def test_the_available_fraction_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n")
    assert memory_available_fraction(meminfo) == 0.25
    assert 0 < memory_available_fraction() <= 1


def test_a_kept_file_serves_only_a_vm_of_about_its_size() -> None:
    """A sparse VM does not take a file that would give it another VM's many zeroed pages for its
    whole life; a VM that holds about as much does; the file stays for it meanwhile."""
    pool = reserve()
    fd = ram_file(64 * MIB, list(range(0, 40 * MIB, PAGE_SIZE)))
    pool.give(fd)
    assert pool.wait_idle(10)
    assert pool.take(64 * MIB) is None, "a new VM (expected 0): 40 MiB is past the 16 MiB slack"
    assert pool.take(64 * MIB, expected_bytes=20 * MIB) is None, "20 MiB + a quarter < 40 MiB"
    assert pool.status()["files"] == 1
    taken = pool.claim(36 * MIB).take(64 * MIB)
    assert taken == fd, "36 MiB + 16 MiB slack fits"
    os.close(taken)
