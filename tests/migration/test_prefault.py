"""The target's prefault helper on a real memfd mapping: how far ahead it allocates."""

from __future__ import annotations

from helpers import wait_for
from migrated.kvm.memory import GuestMemory, MemoryRegion
from migrated.migration.prefault import CHUNK_BYTES, Prefaulter

MIB = 1 << 20


def _allocated(memory: GuestMemory) -> int:
    return memory.allocated_bytes()


def test_lookahead_follows_the_data_received() -> None:
    """A few KiB of data far into the region get a few KiB populated, not the full lookahead:
    the rest stays a hole that the next migration's bulk copy does not read."""
    memory = GuestMemory([MemoryRegion(0, 0, 64 * MIB, 0)])
    try:
        prefault = Prefaulter(memory.address, memory.size)
        try:
            # 64 KiB of data up to 16 MiB: the helper skips to there and populates 64 KiB ahead.
            prefault.advance(16 * MIB, data_bytes=64 << 10)
            wait_for(lambda: prefault.populated_bytes >= 64 << 10, timeout=10, what="the first populate")
            # 4 KiB more, 4 KiB further: the window is now 68 KiB ahead of 16 MiB + 4 KiB.
            prefault.advance(16 * MIB + 4096, data_bytes=4096)
            wait_for(lambda: prefault.populated_bytes >= 72 << 10, timeout=10, what="the second populate")
            prefault.stop()
            assert prefault.error is None
            assert prefault.populated_bytes == 72 << 10
            assert _allocated(memory) == 72 << 10
        finally:
            prefault.stop()
    finally:
        memory.close()


def test_without_a_data_count_the_whole_lookahead_is_populated() -> None:
    """A receiver that does not count its data keeps the full lookahead (a dense bulk copy)."""
    memory = GuestMemory([MemoryRegion(0, 0, 3 * CHUNK_BYTES, 0)])
    try:
        prefault = Prefaulter(memory.address, memory.size)
        try:
            prefault.advance(4096)
            wait_for(lambda: prefault.populated_bytes >= memory.size - 4096, timeout=30, what="the lookahead")
            assert prefault.error is None
        finally:
            prefault.stop()
        assert _allocated(memory) == memory.size - 4096
    finally:
        memory.close()


def test_cancel_returns_at_once_and_stop_joins() -> None:
    memory = GuestMemory([MemoryRegion(0, 0, 8 * MIB, 0)])
    try:
        prefault = Prefaulter(memory.address, memory.size)
        prefault.cancel()
        prefault.advance(4 * MIB, data_bytes=4 * MIB)  # after cancel: populates nothing
        prefault.stop()
        assert prefault.populated_bytes == 0
        assert _allocated(memory) == 0
    finally:
        memory.close()
