"""Fine marks inside the downtime window, on either side, for the `downtime_timeline` event.

`downtime_breakdown_ms` has the few steps an operator reads; this has every hop between them
(worker trips, each message, each wait), so a cost can be found without a profiler. The marks
are `time.perf_counter()` values: CLOCK_MONOTONIC, the same clock in every process of a host, so
two daemons on one machine (the benchmarks) can be laid on one axis with `origin`.
"""

from __future__ import annotations

import time


class Timeline:
    """Named marks from `origin` on. `mark` may run in a worker thread: a list append is atomic,
    and the event loop reads the marks only after that thread returned."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self._marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        self._marks.append((name, time.perf_counter()))

    def as_ms(self) -> dict[str, float]:
        """Each mark's ms since `origin`; a name marked again gets `#2`, `#3`..."""
        out: dict[str, float] = {}
        for name, at in self._marks:
            key, n = name, 1
            while key in out:
                n += 1
                key = f"{name}#{n}"
            out[key] = round((at - self.origin) * 1e3, 3)
        return out
