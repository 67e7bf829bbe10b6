"""Threads started ahead and parked until a data stream needs one.

Every migration starts a thread per data stream on each side (sendstreams.py, recvstreams.py).
`threading.Thread.start` returns only once the new thread has run, and on a busy host that waits
for the scheduler: with a warm link (warmlinks.py) the source's two stream threads were the last
step of its setup, 2.8 ms after ACCEPT (bench/fixed_cost.py, `streams_opened`). A parked thread
was started long before; handing it a job is one condition-variable notify.

A thread takes one job at a time, runs it to its end under the job's name (the downtime window
raises threads by name, realtime.py), then parks again under its own. At most `keep` threads
stay parked; a job that finds none parked gets a fresh thread (started as before), which parks
afterwards if there is room. A job's exception is the job's business: every stream's `_run`
catches and reports its own, and one that escapes is printed and does not end the thread.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable

from ..kvm.threadnames import name_this_thread

PARKED_NAME = "parked-stream-thread"


class Job:
    """What the owner of a job keeps: `join` waits for the job's end (not the thread's)."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self.target = target
        self.name = name
        self.native_id: int | None = None  # the kernel id of the thread that runs it, once it runs
        self._done = threading.Event()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def _run(self, thread: threading.Thread) -> None:
        self.native_id = thread.native_id
        thread.name = self.name
        try:
            self.target()
        except BaseException:  # the job's own error handling failed: say so, keep the thread
            traceback.print_exc(file=sys.stderr)
        finally:
            thread.name = PARKED_NAME
            self._done.set()


class _Worker:
    def __init__(self) -> None:
        self.wake = threading.Event()
        self.job: Job | None = None


class ThreadPark:
    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # parked, each waiting on its own event

    def fill(self) -> None:
        """Start threads until `keep` are parked (the daemon's warm-up calls it, before READY)."""
        with self._lock:
            missing = self._keep - len(self._idle)
        for _ in range(missing):
            self._spawn(None)

    def start(self, target: Callable[[], None], name: str) -> Job:
        """Run `target` in a parked thread, or in a fresh one if none is parked."""
        job = Job(target, name)
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            self._spawn(job)
        else:
            worker.job = job
            worker.wake.set()
        return job

    @property
    def parked(self) -> int:
        with self._lock:
            return len(self._idle)

    def _spawn(self, first: Job | None) -> None:
        worker = _Worker()
        worker.job = first
        threading.Thread(target=self._loop, args=(worker,), name=PARKED_NAME, daemon=True).start()

    def _loop(self, worker: _Worker) -> None:
        name_this_thread("page-stream")  # what every job here does (threadnames.py)
        me = threading.current_thread()
        while True:
            job, worker.job = worker.job, None
            if job is not None:
                job._run(me)
            with self._lock:
                if len(self._idle) >= self._keep:
                    return  # enough parked already: this one ends
                worker.wake.clear()
                self._idle.append(worker)
            worker.wake.wait()


# The daemon's: each side of a migration has `migration.streams` (2 by default) stream threads;
# four parked serve two migrations at once, or one with four streams.
STREAM_THREADS = ThreadPark(keep=4)
