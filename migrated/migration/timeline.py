"""Timing inside the downtime window: fine marks on either side (the `downtime_timeline` and
`cutover_timeline` events), and the downtime the guest saw (`guest_downtime_ms`).

`downtime_breakdown_ms` has the few steps an operator reads (timed by `StepClock`); `Timeline`
has every hop between them (worker trips, each message, each wait), so a cost can be found
without a profiler. The marks are `time.perf_counter()` values: CLOCK_MONOTONIC, the same clock in every process of a host, so
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

    def restart(self) -> None:
        """The origin is now (marks made before it come out negative)."""
        self.origin = time.perf_counter()

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


def guest_downtime_ms(
    paused_at: float, commit_sent_at: float, running_at: float, resume_us: int | None, reply_us: int | None
) -> float | None:
    """From the pause to the target's resume, on this side's clock (seconds in, ms out): COMMIT's
    way there is taken as half the round trip left once the target's own time (`reply_us`, from
    COMMIT's arrival to RUNNING leaving) is taken out, then `resume_us` (COMMIT's arrival to the
    resume). None from a target that did not say (an older release)."""
    if resume_us is None or reply_us is None:
        return None
    one_way_s = max(0.0, (running_at - commit_sent_at) - reply_us / 1e6) / 2
    return (commit_sent_at - paused_at + one_way_s + resume_us / 1e6) * 1e3


class StepClock:
    """Times consecutive steps into `steps` (name -> ms); `step` returns the step's ms."""

    def __init__(self, steps: dict[str, float]) -> None:
        self._steps = steps
        self._last = time.perf_counter()

    def restart(self) -> None:
        """The next step starts now."""
        self._last = time.perf_counter()

    def step(self, name: str) -> float:
        now = time.perf_counter()
        elapsed = (now - self._last) * 1e3
        self._steps[name] = round(elapsed, 3)
        self._last = now
        return elapsed

    def fork(self) -> StepClock:
        """A clock for a worker thread, going on from this one's last step into a dict of its
        own: `steps` is the stats' dict, which the event loop reads (`migration status`)."""
        other = StepClock({})
        other._last = self._last
        return other

    def merge(self, other: StepClock) -> None:
        """Back on the event loop: the worker's steps join these, and the next step starts
        where the worker's last ended."""
        self._steps.update(other._steps)
        self._last = other._last
