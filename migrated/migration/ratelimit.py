"""One bandwidth limit shared by every data stream's thread (`max_bandwidth_mib_s`).

A token bucket: each batch takes its bytes before it is sent, and a thread that finds the bucket
short waits for the deficit at the current rate. The rate can change at any time (`migration
set`); a waiting thread sees the change within one wake-up. The wait ends early when the streams
stop, so a limited migration is cancelled as promptly as an unlimited one.
"""

from __future__ import annotations

import threading
import time

# A burst of at most this long at the limit: enough for one batch per stream, short enough that
# the average holds over any window an operator looks at.
BURST_S = 0.05
# Longest single wait, so a raised limit (or stop) is noticed soon.
MAX_WAIT_S = 0.1


class TokenBucket:
    def __init__(self, bytes_per_s: float, stop: threading.Event) -> None:
        self._lock = threading.Lock()
        self._rate = bytes_per_s
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._stop = stop

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, bytes_per_s: float) -> None:
        """0 lifts the limit."""
        with self._lock:
            self._refill()
            self._rate = bytes_per_s

    def take(self, nbytes: int) -> bool:
        """Wait until `nbytes` may go; False if the streams were stopped meanwhile."""
        while not self._stop.is_set():
            with self._lock:
                if self._rate <= 0:
                    return True
                self._refill()
                if self._tokens >= 0:
                    # Debt is allowed: a batch larger than the burst still goes, and the next waits.
                    self._tokens -= nbytes
                    return True
                wait = min(-self._tokens / self._rate, MAX_WAIT_S)
            self._stop.wait(wait)
        return False

    def _refill(self) -> None:
        now = time.monotonic()
        if self._rate > 0:
            self._tokens = min(self._tokens + (now - self._stamp) * self._rate, self._rate * BURST_S)
        self._stamp = now
