"""The data streams' record buffers, kept between streams and migrations (transport/seal.py).

Each sealed data stream holds buffers of its largest record: the source one, which it seals
into; the target two, one it receives records into and one it opens them into (cryptography
refuses to decrypt in place from version 51). Fresh, such a buffer costs more than the AES-GCM
that fills it: its pages are faulted and zeroed on first touch (a 4 MiB buffer ~3 ms here,
sealing it 0.5 ms), and a migration of a few MiB paid that on both sides, every time. Given back
when a stream ends, a buffer serves the next stream of either direction, warm.

What is kept is bounded (`MAX_KEPT`, `MAX_KEPT_BYTES`): the buffers of a target's two default
streams, whatever ran before; the largest are kept, as they serve any record.
"""

from __future__ import annotations

import threading
from typing import Final

from transport import framing, limits, seal

MIB = 1 << 20
MAX_KEPT: Final = 4
MAX_KEPT_BYTES: Final = 40 * MIB
"""Four buffers of the default 8 MiB batch (and their framing): a target's two default streams
(a source's need two). A daemon idle after its first migration holds this much more than before it."""


def largest_record_bytes(max_batch_bytes: int) -> int:
    """A buffer that holds any record of a batch of up to `max_batch_bytes`, on either side: the
    frame (prefix, header, pages), the tag, and the cipher block `Sealer` wants room for."""
    return framing.PREFIX.size + limits.MAX_HEADER_BYTES + max_batch_bytes + seal.TAG_BYTES + 16


class RecordBuffers:
    """A bounded pool of bytearrays, taken and given back by the stream threads."""

    def __init__(self, max_kept: int = MAX_KEPT, max_kept_bytes: int = MAX_KEPT_BYTES) -> None:
        self._lock = threading.Lock()
        self._kept: list[bytearray] = []  # largest first
        self._max_kept = max_kept
        self._max_kept_bytes = max_kept_bytes
        self.allocated = 0  # buffers made because none kept was large enough

    def take(self, size: int) -> bytearray:
        """The largest kept buffer if it holds `size` bytes (a stream's later, larger records
        then fit it too), else a new one of `size` bytes."""
        with self._lock:
            if self._kept and len(self._kept[0]) >= size:
                return self._kept.pop(0)
            self.allocated += 1
        return bytearray(size)

    def prefill(self, size: int) -> int:
        """Up to the bounds, buffers of `size` bytes made now, their pages touched (a bytearray
        is zero-filled at creation): the first records of the first migrations then find them
        warm instead of paying the faults inside the copy. Returns how many were made."""
        made = 0
        with self._lock:
            while len(self._kept) < self._max_kept and sum(len(b) for b in self._kept) + size <= self._max_kept_bytes:
                self._kept.append(bytearray(size))
                made += 1
            self._kept.sort(key=len, reverse=True)
        return made

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            self._kept.append(buffer)
            self._kept.sort(key=len, reverse=True)
            del self._kept[self._max_kept :]
            while sum(len(b) for b in self._kept) > self._max_kept_bytes:
                self._kept.pop()

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._kept)


RECORD_BUFFERS: Final = RecordBuffers()
"""The daemon's one pool: every data stream of every migration, both directions."""
