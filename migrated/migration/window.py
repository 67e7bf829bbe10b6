"""The downtime window: what this process does differently while a VM is paused for its cutover.

Python's cyclic garbage collector stops every thread of the process while it runs (it holds the
GIL), and a collection of the oldest generation walks every tracked object of the daemon: tens
of milliseconds, measured inside downtime steps (`downtime_gc_ms` in the stats). So, for a window bounded
by the downtime guard, automatic collections are off (`gc.disable`, counted, since windows of
several migrations overlap), and the objects that exist once the daemon is up are moved out of
the collector's reach (`freeze_startup_objects`, the standard `gc.freeze` after start-up), so
that the collections that do run outside the window walk only what came since.

With `realtime`, the threads that do the downtime's work also run at SCHED_FIFO for the window
(realtime.py), and go back to their own policy when it closes. A target's event loop can be raised
before its window opens (`raise_event_loop`): the state's arrival is itself a wake-up of the event
loop, which on a busy host waited 5-15 ms for a core at the normal policy (bench/timeline.py:
`tgt.state_received` against `src.state_and_done_sent`). A target opens its window when its data
streams have ended, just before the source pauses, or else when the first state arrives.

`GcMonitor` times every collection (`gc.callbacks`), so a window reports what the collector
cost inside it: the evidence, and the check that the window keeps it at zero.

A window also tells which modules were first imported while it was open (`imported`): a lazy
import is a cold path that only the first migration of a process pays, and it lands in the
downtime (numpy's `np.unique` imported `numpy.ma` on its first call: 8-9 ms inside `state_save`
of the first migration out of a daemon whose VM had arrived by migration).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from typing import Any

from structlog.typing import FilteringBoundLogger

from ..cpulatency import CPU_LATENCY
from ..realtime import RAISED, window_thread_ids


# The downtime's state work (the source's pause, harvest and save; the target's restore without a
# digest) runs on the event loop for a VM of up to this many vCPUs, in a worker thread beyond: a
# worker's trip there and back cost 0.3-0.4 ms of the downtime here, more than the work itself
# keeps the loop from other work (0.5-1 ms per vCPU measured, so a few milliseconds at most).
STATE_WORK_ON_LOOP_MAX_VCPUS = 4


class GcMonitor:
    """Process-wide: total milliseconds spent in collections, and their count, so far."""

    def __init__(self) -> None:
        self.total_ms = 0.0
        self.collections = 0
        self._started: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the collector itself, with the GIL held, in whichever thread triggered it.
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.total_ms += (time.perf_counter() - self._started) * 1e3
            self.collections += 1
            self._started = None

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)


MONITOR = GcMonitor()

_lock = threading.Lock()
_open_windows = 0
_was_enabled = True


def freeze_startup_objects() -> int:
    """After start-up: every object alive now (modules, classes, the config) is never walked by
    a collection again. Returns how many were frozen."""
    MONITOR.install()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class DowntimeWindow:
    """`with DowntimeWindow() as window:` around a downtime; `window.gc_ms` and
    `window.gc_collections` are what the collector cost inside it (0 unless someone called
    `gc.collect()` explicitly)."""

    def __init__(self, realtime: bool = False, idle_polling: bool = False) -> None:
        self.realtime = realtime
        self.idle_polling = idle_polling  # hold CPU_LATENCY while open (cpulatency.py)
        self._polling = False
        self.realtime_error: str | None = None  # why the threads could not be raised
        self.raised_threads = 0
        self._raised: set[int] = set()
        self._raised_early: set[int] = set()  # `raise_event_loop`, lowered by `close`
        self.gc_ms = 0.0
        self.gc_collections = 0
        self._gc_ms_before = 0.0
        self._collections_before = 0
        self._open = False
        self._modules_at_open = 0
        self.imported: tuple[str, ...] = ()  # modules first imported while it was open

    def __enter__(self) -> DowntimeWindow:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def gc_ms_so_far(self) -> float:
        return MONITOR.total_ms - self._gc_ms_before if self._open else self.gc_ms

    def open(self) -> None:
        """Idempotent: a window opens once."""
        global _open_windows, _was_enabled
        if self._open:
            return
        self._open = True
        MONITOR.install()
        with _lock:
            if _open_windows == 0:
                _was_enabled = gc.isenabled()
                gc.disable()
            _open_windows += 1
        self._gc_ms_before = MONITOR.total_ms
        self._collections_before = MONITOR.collections
        # sys.modules keeps insertion order: what comes after this count was imported since.
        self._modules_at_open = len(sys.modules)
        if self.idle_polling:
            CPU_LATENCY.hold()  # released by `close`
            self._polling = True
        if self.realtime:
            # From the event loop's thread: it is the first of the threads raised.
            self._raised, self.realtime_error = RAISED.raise_threads(window_thread_ids())
            self.raised_threads = len(self._raised)

    def raise_event_loop(self) -> None:
        """Before the window opens: the calling thread (the event loop) alone at the window's
        policy until `lower_event_loop` or `close`, so that its wake-ups do not wait for a core.
        For a setup (a chain of hops between two daemons' loops, which a shared core otherwise
        time-slices against each other) and for a target's loop whose pages come on data
        streams (the state's arrival, the downtime's first wake-up on that side). Only while the
        loop does no bulk work of its own. Idempotent."""
        if not self.realtime or self._raised_early:
            return
        self._raised_early, error = RAISED.raise_threads({threading.get_native_id()})
        self.realtime_error = self.realtime_error or error

    def lower_event_loop(self) -> None:
        """`raise_event_loop` undone (the window itself raises it again when it opens). Idempotent."""
        RAISED.lower(self._raised_early)
        self._raised_early = set()

    def raise_for_pause(self, thread_ids: set[int]) -> set[int]:
        """The vCPU threads for their way out of KVM_RUN and into their park: a thread the host
        had preempted waited for a core behind its other work (the pause took 5-11 ms at load 8
        here, 0.7 ms quiet). Returns what to pass to `lower` as soon as they parked: raised
        while they run the guest, they would starve the host (realtime.py)."""
        if not self.realtime:
            return set()
        raised, _ = RAISED.raise_threads(thread_ids)
        return raised

    def log_imports(self, log: FilteringBoundLogger) -> None:
        """After `close`: the modules first imported while it was open, a cold path in the
        downtime each, named in one `downtime_window_imports` warning (none: nothing logged)."""
        if self.imported:
            log.warning("downtime_window_imports", modules=list(self.imported))

    @staticmethod
    def lower(thread_ids: set[int]) -> None:
        RAISED.lower(thread_ids)

    def close(self) -> None:
        """Idempotent; a window never opened closes as a no-op (but lowers what
        `raise_event_loop` raised)."""
        global _open_windows
        self.lower_event_loop()
        if self._polling:
            CPU_LATENCY.release()
            self._polling = False
        if not self._open:
            return
        self._open = False
        self.gc_ms = MONITOR.total_ms - self._gc_ms_before
        self.gc_collections = MONITOR.collections - self._collections_before
        if len(sys.modules) > self._modules_at_open:
            self.imported = tuple(list(sys.modules)[self._modules_at_open :])
        RAISED.lower(self._raised)
        self._raised = set()
        with _lock:
            _open_windows -= 1
            if _open_windows == 0 and _was_enabled:
                gc.enable()
