"""The continuous harvester's wait on a set of rings, in the shim (rr_wait_dirty)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _args
from ._constants import DIRTY_GFN_SIZE
from ._shim import RingReaderError, check, check_ring_aligned, ffi, lib


class RingWaiter:
    """Waits, without the GIL, until some of `rings` are worth harvesting.

    `fetch_indices[i]` is ring i's next entry to harvest: the harvester writes it after every
    harvest and the wait reads it afresh at every check. `stop()` ends a wait within 10 ms,
    from any thread. The rings must stay mapped while a wait runs: the owner stops
    the waiting thread and joins it before unmapping them.
    """

    def __init__(self, rings: Sequence[_args.RingBuffer], n_entries: int) -> None:
        self.n_entries = _args.n_entries(n_entries)
        self.fetch_indices: npt.NDArray[np.uint32] = np.zeros(max(1, len(rings)), np.uint32)
        self._stop = np.zeros(1, np.int32)
        self._due = ffi.new("int32_t *")
        self._buffers: list[Any] = []
        for ring in rings:
            _args.ring_buffer(ring, self.n_entries, DIRTY_GFN_SIZE)
            c_ring = ffi.from_buffer("struct rr_dirty_gfn[]", ring, require_writable=True)
            check_ring_aligned(c_ring)
            self._buffers.append(c_ring)
        self._rings = ffi.new("struct rr_dirty_gfn *[]", self._buffers or [ffi.NULL])
        self._n_rings = len(self._buffers)
        self._c_fetch = ffi.from_buffer("uint32_t[]", self.fetch_indices)
        # rr_wait_dirty's scratch: how far each ring was seen filled, and by how much at the last check.
        self._c_marks = ffi.new("uint32_t[]", len(self.fetch_indices))
        self._c_passed = ffi.new("uint32_t[]", len(self.fetch_indices))
        self._c_stop = ffi.from_buffer("int32_t[]", self._stop)

    def wait(self, threshold: int, interval_s: float, max_interval_s: float, idle_s: float) -> tuple[int, bool]:
        """Check the rings until one holds `threshold` entries waiting, or, once the intervals
        slept add up to `idle_s`, until any ring holds one, or until `stop()`. Returns (checks
        made, whether a harvest is due).

        The checks come every `interval_s` while a ring fills fast enough to reach the threshold
        soon, and up to `max_interval_s` apart while the rings fill slowly or not at all
        (rr_wait_dirty): a quiet VM's harvester wakes up that much less often."""
        threshold = _args.as_int("threshold", threshold, 1, self.n_entries)
        if not 1e-6 <= interval_s <= 86400:
            raise RingReaderError(f"interval_s must be from 1 us to a day, got {interval_s} s")
        if not interval_s <= max_interval_s <= 86400:
            raise RingReaderError(f"max_interval_s must be from interval_s to a day, got {max_interval_s} s")
        if not 1e-6 <= idle_s <= 86400:
            raise RingReaderError(f"idle_s must be from 1 us to a day, got {idle_s} s")
        checks = lib.rr_wait_dirty(
            self._rings,
            self._c_fetch,
            self._c_marks,
            self._c_passed,
            self._n_rings,
            self.n_entries,
            threshold,
            self._c_stop,
            round(interval_s * 1e9),
            round(max_interval_s * 1e9),
            round(idle_s * 1e9),
            self._due,
        )
        return check(checks, "rr_wait_dirty"), bool(self._due[0])

    def stop(self) -> None:
        """Ends the current and every later wait within one interval."""
        self._stop[0] = 1

    @property
    def stopped(self) -> bool:
        return bool(self._stop[0])

    def release(self) -> None:
        """Lets go of the rings' buffers (so that their mmaps can close); waits no more."""
        self.stop()
        for c_ring in self._buffers:
            ffi.release(c_ring)
        self._buffers.clear()
        self._n_rings = 0
