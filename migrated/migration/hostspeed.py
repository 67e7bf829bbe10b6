"""How fast the host is now: a probe taken in every dirty round, for the prediction to see a host
that became slower since its costs were learned (policy.DowntimeModel.slowdown).

The probe is a worker-thread trip carrying a fixed piece of CPU work (hashing 256 KiB, the GIL
released): what every downtime step is made of. On a quiet host it takes ~0.5 ms; beside a CPU
hog both the wake-ups and the work wait for a core, and it takes what the downtime's steps will.
It rides on the round's own trip to the harvest, so it adds no wake-up of its own.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

PROBE_BYTES = 256 << 10
_PROBE_DATA = bytes(PROBE_BYTES)


def probe_work() -> float:
    """The probe's CPU work; returns the seconds it took (in the calling thread)."""
    started = time.perf_counter()
    hashlib.sha256(_PROBE_DATA).digest()
    return time.perf_counter() - started


def then_probe(work: Callable[[], T]) -> tuple[T, float]:
    """In a worker thread: `work`, then the probe; returns work's result and the seconds `work`
    took, so that the caller's trip minus these is the probe with its wake-ups."""
    started = time.perf_counter()
    result = work()
    elapsed = time.perf_counter() - started
    probe_work()
    return result, elapsed


class HostSpeed:
    """The last rounds' probes (ms). `now_ms`: their median once there are three, the slowest
    before that: one fast probe must not hide a slow host, and more rounds settle it."""

    RECENT = 5

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=self.RECENT)

    def add(self, probe_ms: float) -> None:
        if probe_ms > 0:
            self._samples.append(probe_ms)

    @property
    def now_ms(self) -> float:
        if not self._samples:
            return 0.0
        if len(self._samples) < 3:
            return max(self._samples)
        return float(statistics.median(self._samples))
