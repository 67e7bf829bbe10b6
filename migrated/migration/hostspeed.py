"""How fast the host is now, for the prediction to see a host that became slower since its costs
were learned (policy.DowntimeModel.slowdown): the time this migration's sends took per GiB.

Sending pages is CPU work on both sides (copy, seal, open, write), done by the same kind of
threads as the downtime's steps, so it slows down with them when the cores are busy. It is
measured anyway (the bulk copy, and every round big enough to time the link's rate rather than
its latency), so it costs nothing. A short probe of its own was tried first: 256 KiB hashed in a
worker thread took 0.3-1.5 ms beside a CPU hog as on a quiet host (the scheduler favours a thread
that wakes up for a moment), while the downtime's longer steps were slowed down.
"""

from __future__ import annotations

import statistics
from collections import deque

GIB = 1 << 30
# A send of a few pages times the link's latency and the wake-ups around it, not the host's
# speed: a 15-page bulk copy took 10.7 ms beside a CPU hog (180 s per GiB), which against an
# earlier tiny send read as the 8x slowdown cap and priced a 20 ms downtime at 411 ms. The same
# floor as the bandwidth's samples (source.BANDWIDTH_SAMPLE_MIN_BYTES).
MIN_SAMPLE_BYTES = 1 << 20


class HostSpeed:
    """The last sends' ms per GiB. `now_ms_per_gib`: their median once there are three, the
    slowest before that: one fast send must not hide a slow host, and more rounds settle it."""

    RECENT = 5

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=self.RECENT)

    def add(self, sent_bytes: int, seconds: float) -> None:
        if sent_bytes >= MIN_SAMPLE_BYTES and seconds > 0:
            self._samples.append(seconds * 1e3 / (sent_bytes / GIB))

    @property
    def now_ms_per_gib(self) -> float:
        if not self._samples:
            return 0.0
        if len(self._samples) < 3:
            return max(self._samples)
        return float(statistics.median(self._samples))
