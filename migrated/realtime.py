"""Can the ring harvester (and a downtime's threads) run at SCHED_FIFO? Asked once at start-up, so
the answer is in the log before any VM exists instead of only in `vm show --json` after a
migration went wrong. The second half of this file raises a downtime window's threads.

The harvester (kvm/vm.py) asks for SCHED_FIFO priority 1 for its own thread. That needs
CAP_SYS_NICE or RLIMIT_RTPRIO >= 1, and no seccomp filter against it (RestrictRealtime=yes is
one). The unit grants both: LimitRTPRIO=1 alone would do without a capability, but systemd can
raise that hard limit only where it holds CAP_SYS_RESOURCE, which containers (our CI machines)
lack. On a busy host a normal thread was kept off the
CPU for up to 113 ms, long enough for a ring to fill under emulated guest writes, which on PVM
livelocks the vCPU (HOST-NOTES); at SCHED_FIFO 1 the gaps stayed under ~17 ms.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

HARVESTER_PRIORITY = 1

COST_WITHOUT_REALTIME = (
    "the dirty-ring harvester runs as a normal thread: on a busy host it can be kept off the CPU "
    "for 100 ms and more, a ring can fill, and on PVM hosts a full ring under emulated guest code "
    "livelocks the vCPU and fails the migration; and a downtime's threads run as normal threads too "
    "(migration.downtime_realtime), so on a busy host each of its wake-ups can wait for a CPU and the "
    "downtime can exceed its limit"
)
FIX = (
    "give the daemon CAP_SYS_NICE (CapabilityBoundingSet=CAP_SYS_NICE) or RLIMIT_RTPRIO >= 1 "
    "(LimitRTPRIO=1), and drop RestrictRealtime=yes from its unit"
)


def probe_in_thread(attempt: Callable[[], str | None], name: str) -> str | None:
    """What `attempt` returns (None: allowed, else why not), run in a thread of its own that ends
    at once: a scheduling change a probe makes stays with that thread, never with the daemon's."""
    outcome: list[str | None] = []
    probe = threading.Thread(target=lambda: outcome.append(attempt()), name=name)
    probe.start()
    probe.join()
    return outcome[0] if outcome else "the probe thread ended without an answer"


def probe_realtime() -> str | None:
    """None if a thread of this process may switch to SCHED_FIFO at the harvester's priority,
    else why not."""

    def attempt() -> str | None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(HARVESTER_PRIORITY))
        except OSError as err:
            return f"sched_setscheduler(SCHED_FIFO, {HARVESTER_PRIORITY}): {err.strerror}"
        return None

    return probe_in_thread(attempt, "realtime-probe")


# ---- the downtime window ---------------------------------------------------------------------
# The threads that do a downtime's work run at SCHED_FIFO for the window only (window.py). On a
# host with every core busy a normal thread waits for a CPU at each wake-up: a worker's result
# reached the event loop 15.9 ms after the worker finished, with 0.9 ms of work in the step
# (bench/fixed_cost.py, a boot-sector guest). The same priority as the harvester: RLIMIT_RTPRIO 1
# (the unit's LimitRTPRIO=1) suffices. SCHED_RESET_ON_FORK: a thread started by a raised thread
# (a new trio worker, a vCPU thread) starts as a normal one, never inherits the window's policy.

WINDOW_POLICY = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK

# Threads by name: trio's cached workers ("Trio thread N", or "<function> from <task>" while they
# run a job) and the page streams of both sides (sendstreams.py, recvstreams.py). vCPU threads,
# the throttle and the prefaulter stay as they are: raised, a busy guest would starve the host.
_WINDOW_THREAD_PREFIXES = ("Trio thread", "data-stream-", "data-recv-")


def window_thread_ids() -> set[int]:
    """The calling thread (the event loop's) and the threads a downtime hands work to."""
    ids = {threading.get_native_id()}
    for thread in threading.enumerate():
        name = thread.name
        if thread.native_id is not None and (name.startswith(_WINDOW_THREAD_PREFIXES) or " from " in name):
            ids.add(thread.native_id)
    return ids


class RaisedThreads:
    """Which threads the open windows raised, counted: windows of concurrent migrations overlap,
    and a thread goes back to its own policy only when the last window that raised it closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raised: dict[int, tuple[int, int, int]] = {}  # id -> (windows, policy, priority) before

    def raise_threads(self, ids: set[int]) -> tuple[set[int], str | None]:
        """Raises what it may; returns the ids it raised (to pass to `lower`), and why not all
        (None: every one)."""
        raised: set[int] = set()
        error: str | None = None
        with self._lock:
            for tid in sorted(ids):
                if tid in self._raised:
                    count, policy, priority = self._raised[tid]
                    self._raised[tid] = (count + 1, policy, priority)
                    raised.add(tid)
                    continue
                try:
                    policy = os.sched_getscheduler(tid)
                    if policy & ~os.SCHED_RESET_ON_FORK in (os.SCHED_FIFO, os.SCHED_RR):
                        continue  # real-time already (a harvester): its own priority stands
                    priority = os.sched_getparam(tid).sched_priority
                    os.sched_setscheduler(tid, WINDOW_POLICY, os.sched_param(HARVESTER_PRIORITY))
                except ProcessLookupError:
                    continue  # the thread ended meanwhile
                except OSError as err:
                    error = f"sched_setscheduler(SCHED_FIFO, {HARVESTER_PRIORITY}): {err.strerror}"
                    break  # EPERM for one is EPERM for all
                self._raised[tid] = (1, policy, priority)
                raised.add(tid)
        return raised, error

    def lower(self, ids: set[int]) -> None:
        with self._lock:
            for tid in ids:
                count, policy, priority = self._raised.pop(tid, (1, os.SCHED_OTHER, 0))
                if count > 1:
                    self._raised[tid] = (count - 1, policy, priority)
                    continue
                try:
                    os.sched_setscheduler(tid, policy, os.sched_param(priority))
                except OSError:
                    pass  # ended meanwhile (ESRCH): nothing left to lower

    def __len__(self) -> int:
        return len(self._raised)


RAISED = RaisedThreads()
