"""The target's VM record written in a thread of its own (background_record.py): `wait` returns
once it is written, raises the write's error once, and returns at once for a record never
started. Real threads, a real trio loop; the write itself is the test's."""

from __future__ import annotations

import threading

import trio
import trio.testing

from migrated.migration.background_record import BackgroundRecord


def test_wait_returns_once_the_record_is_written_and_raises_its_error_once() -> None:
    release = threading.Event()
    written: list[str] = []
    timed: list[float] = []

    def write() -> None:
        assert release.wait(10)
        written.append("record")
        raise OSError("state dir gone")

    async def main() -> None:
        record = BackgroundRecord(write, timed.append)
        record.start()
        outcome: list[BaseException | None] = []

        async def waiter() -> None:
            try:
                await record.wait()
                outcome.append(None)
            except OSError as err:
                outcome.append(err)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == [] and written == [], "returned before the write"
            release.set()
        assert len(outcome) == 1 and "state dir gone" in str(outcome[0])
        assert written == ["record"] and len(timed) == 1
        await record.wait()  # the error was raised once; now it is only done

    trio.run(main)


def test_a_record_never_started_is_not_waited_for() -> None:
    async def main() -> None:
        with trio.fail_after(5):
            await BackgroundRecord(lambda: None, lambda ms: None).wait()

    trio.run(main)
