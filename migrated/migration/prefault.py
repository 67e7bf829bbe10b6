"""Allocating the target's guest RAM ahead of the bulk copy, on another core.

A page of a fresh memfd costs the kernel a fault and a clear_page on first write; on this nested
host that is most of the target's CPU time in the bulk copy (perf: clear_page_erms 63%), and the
receiving thread would pay it page by page. A helper thread populates (MADV_POPULATE_WRITE) the
range just ahead of the highest page received so far, so the receiver copies into memory that is
already there. The bulk copy sends a slot's data extents in address order: a jump in the received
position means a hole was skipped; populating restarts at the new position, and after a few jumps
(a sparse guest) the helper stops, so it never allocates more than a few lookaheads of holes.

The lookahead grows with the data received (when the receiver says how much): never more ahead
than has arrived so far, up to LOOKAHEAD_BYTES. A guest with a few MiB of data then gets a few
MiB populated, not 128 MiB of zeros that this host would clear now and that the next migration
of the VM would have to read back out of the RAM file's data extents.
"""

from __future__ import annotations

import threading

from ..kvm.memory import populate_write
from ..kvm.threadnames import name_this_thread

LOOKAHEAD_BYTES = 128 << 20
CHUNK_BYTES = 8 << 20
MAX_JUMPS = 8


class Prefaulter:
    def __init__(self, address: int, size: int) -> None:
        self._address = address
        self._size = size
        self._received = 0
        self._data_bytes: int | None = 0  # None: the receiver does not count, use the full lookahead
        self._populated = 0
        self._jumps = 0
        self._stopped = False
        self._cond = threading.Condition()
        self.populated_bytes = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="prefault", daemon=True)
        self._thread.start()

    def advance(self, end_byte: int, data_bytes: int | None = None) -> None:
        """The receiver has written up to `end_byte` of the region, `data_bytes` more of it."""
        with self._cond:
            if data_bytes is None:
                self._data_bytes = None
            elif self._data_bytes is not None:
                self._data_bytes += data_bytes
            if end_byte > self._received:
                self._received = end_byte
                self._cond.notify()

    def cancel(self) -> None:
        """Populate nothing more; the chunk in progress ends on its own (`stop` waits for it)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def stop(self) -> None:
        self.cancel()
        self._thread.join()

    def _limit(self) -> int:
        lookahead = LOOKAHEAD_BYTES if self._data_bytes is None else min(LOOKAHEAD_BYTES, self._data_bytes)
        return min(self._size, self._received + lookahead)

    def _run(self) -> None:
        name_this_thread("prefault")
        while True:
            with self._cond:
                while not self._stopped and self._populated >= self._limit():
                    self._cond.wait()
                if self._stopped:
                    return
                if self._received > self._populated:
                    if self._received > self._populated + CHUNK_BYTES:
                        self._jumps += 1  # the sender skipped a hole: start again where it is
                        if self._jumps > MAX_JUMPS:
                            return
                    # What lies behind the received position was written, and populated so.
                    self._populated = self._received
                start = self._populated
                end = min(self._limit(), start + CHUNK_BYTES)
                self._populated = end
            try:
                populate_write(self._address + start, end - start)
            except OSError as err:
                self.error = f"MADV_POPULATE_WRITE failed: {err.strerror} (errno {err.errno})"
                return
            self.populated_bytes += end - start
