"""A VM record written in a thread of its own, waited for only where it must be on disk.

The target's record of an incoming VM (two fsyncs, 1-8 ms on these hosts) held its first
control read; DESIGN 5 needs it only from LOADED on (after which a crash may cost a VM only that
side can still run, and a successor daemon reports it from the record, vmrecords.py), and
before a discard removes it (or a record written late would outlive the VM).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

from .. import faults

SLOW_RECORD_S = 0.5  # fault target-record-slow: a slow state dir, made deterministic


class BackgroundRecord:
    def __init__(self, write: Callable[[], None], on_written: Callable[[float], None]) -> None:
        """`write` runs in its own thread; `on_written(ms)`, how long it took, on the event loop
        at the first `wait` after it (so the stats gain the step after the steps before)."""
        self._write = write
        self._on_written = on_written
        self._done = trio.Event()
        self._outcome: Any = None
        self._started = False
        self._elapsed_ms: float | None = None

    def start(self) -> None:
        token = trio.lowlevel.current_trio_token()
        started = time.perf_counter()
        slow = faults.active("target-record-slow")

        def write() -> None:
            if slow:
                time.sleep(SLOW_RECORD_S)
            self._write()

        def deliver(outcome: Any) -> None:
            self._outcome = outcome
            self._elapsed_ms = round((time.perf_counter() - started) * 1e3, 3)
            try:
                token.run_sync_soon(self._done.set)
            except trio.RunFinishedError:
                pass  # the daemon's loop ended meanwhile: nobody waits any more

        self._started = True
        trio.lowlevel.start_thread_soon(write, deliver)

    async def wait(self) -> None:
        """Until the record is written (at once if it never started); raises what the write
        raised, once. Shielded: a discard must not remove it before it is written. Not awaited
        once done: a wait on a set Event still passes through the scheduler (the downtime)."""
        if self._started and not self._done.is_set():
            with trio.CancelScope(shield=True):
                await self._done.wait()
        elapsed, self._elapsed_ms = self._elapsed_ms, None
        if elapsed is not None:
            self._on_written(elapsed)
        outcome, self._outcome = self._outcome, None
        if outcome is not None:
            outcome.unwrap()
