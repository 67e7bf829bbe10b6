"""The target's book of incoming migrations (migrated/migration/incoming.py): admission against
both limits, freed on leave, and a history bounded in entries."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from migrated.migration.incoming import HISTORY_ENTRIES, Incoming

MIB = 1 << 20


def test_admission_counts_and_frees() -> None:
    book = Incoming()
    book.admit("m1", object(), 64 * MIB, max_count=2, max_memory_bytes=1024 * MIB)
    book.admit("m2", object(), 64 * MIB, max_count=2, max_memory_bytes=1024 * MIB)
    with pytest.raises(ValueError, match=r"2 incoming migrations in progress.*migration.max_incoming = 2"):
        book.admit("m3", object(), 64 * MIB, max_count=2, max_memory_bytes=1024 * MIB)
    book.leave("m1")
    book.admit("m3", object(), 64 * MIB, max_count=2, max_memory_bytes=1024 * MIB)
    assert len(book) == 2


def test_admission_sums_guest_ram() -> None:
    book = Incoming()
    book.admit("m1", object(), 96 * MIB, max_count=8, max_memory_bytes=160 * MIB)
    with pytest.raises(ValueError, match=r"64 MiB .* to 160 MiB, over migration.max_incoming_memory_mib = 160"):
        book.admit("m2", object(), 64 * MIB + 1, max_count=8, max_memory_bytes=160 * MIB)
    book.admit("m2", object(), 64 * MIB, max_count=8, max_memory_bytes=160 * MIB)  # exactly at the limit
    book.leave("m1")
    book.leave("m1")  # twice: harmless
    book.admit("m3", object(), 96 * MIB, max_count=8, max_memory_bytes=160 * MIB)


def test_a_migration_id_is_used_once() -> None:
    book = Incoming()
    book.admit("m1", object(), MIB, max_count=8, max_memory_bytes=8 * MIB)
    with pytest.raises(ValueError, match="already used"):
        book.admit("m1", object(), MIB, max_count=8, max_memory_bytes=8 * MIB)
    book.record("m1", "running")
    book.leave("m1")
    with pytest.raises(ValueError, match="already used"):  # a finished one's id too
        book.admit("m1", object(), MIB, max_count=8, max_memory_bytes=8 * MIB)


def test_history_keeps_the_latest_outcomes_only() -> None:
    book = Incoming()
    for number in range(HISTORY_ENTRIES + 10):
        book.record(f"m{number}", "aborted")
    assert book.outcome("m0") is None and book.outcome("m9") is None  # the oldest ten went
    assert book.outcome("m10") == "aborted"
    book.record("m5", "running")  # forgotten, recorded anew: the newest, and m10 goes
    book.record("m20", "running")  # updated in place: moves to the newest end
    assert book.outcome("m10") is None and book.outcome("m11") == "aborted"
    assert book.outcome("m5") == "running"
    assert book.outcome("m20") == "running"
    assert book.outcome(f"m{HISTORY_ENTRIES + 9}") == "aborted"
    assert len(book._history) == HISTORY_ENTRIES


def test_a_data_stream_waits_for_its_migration_to_be_admitted_and_no_longer() -> None:
    """wait_live: a stream taken up before its migration's description was read finds the
    migration once admitted; one for a migration that never comes (or already ended) gets
    None at its timeout, counted on trio's clock (MockClock: no real waiting)."""
    book = Incoming()
    target = object()
    found: list[object] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def stream() -> None:
                found.append(await book.wait_live("m1", timeout_s=30))

            nursery.start_soon(stream)
            await trio.testing.wait_all_tasks_blocked()
            assert not found  # precondition: the stream is waiting
            book.admit("m1", target, 64 * MIB, max_count=8, max_memory_bytes=1024 * MIB)
        started = trio.current_time()
        assert await book.wait_live("m-never", timeout_s=30) is None
        assert trio.current_time() - started == pytest.approx(30)
        book.leave("m1")
        book.record("m1", "running")
        assert await book.wait_live("m1", timeout_s=30) is None  # ended: no wait at all
        assert trio.current_time() - started == pytest.approx(30)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert found == [target]
