"""The migrating guest's vCPU threads yield the CPU to the migration (`migration.vcpu_nice`,
`migration.vcpu_sched_idle_s`).

On a host whose cores are all busy, the source's migration threads (event loop, page streams)
wait for a core behind the guest's own vCPUs, and every step of the setup and the copy takes
longer; the guest keeps dirtying meanwhile. Measured here (bench/fixed_cost.py, the boot-sector
guest keeping one of two cores busy, 4 interleaved rounds of 6 migrations): total 32-43 ms at
nice 0, 27-40 ms at nice 10. A nice value only matters when threads compete: on a host with idle
cores the guest runs as fast as before, so this is a throttle that costs the guest nothing unless
the migration needs the CPU.

A nice value is not enough on its own. The scheduler wakes a thread on the CPU of the thread
that woke it (a message from the other daemon, a stream thread's report) and leaves it queued
there behind that thread while the other CPU runs the nice guest; and once a thread has had
more than its share, the guest is picked before it, and runs until the next tick (4 ms here)
or until its emulation returns to a scheduling point (perf sched: the target's event loop
waited 1.3 ms with a description in hand, the source's 1.8 ms). Under SCHED_IDLE the kernel
counts a CPU that runs only the guest as idle when it places a woken thread, and any other
thread preempts the guest at once. So the vCPU threads run under SCHED_IDLE from the start of the
migration for `vcpu_sched_idle_s` (1 s) at most (bench/fixed_cost.py, 24 migrations each,
interleaved: total 29.9 -> 24.8 ms, setup 8.8 -> 6.9 ms). Not longer: on a host whose cores are
all busy a SCHED_IDLE guest gets almost no CPU, and what it buys (the setup, small copies: chains
of wake-ups) is over within that; a longer copy is bound by the data plane. Nor past the pause:
for it they are back under their own policy (at the nice value), since a vCPU thread has to run
to leave KVM_RUN, and under SCHED_IDLE on a busy host it would wait for a core in the downtime.

The vCPU threads go back to their policy and nice value when the migration ends without cutover
(the VM runs here again). Going back needs CAP_SYS_NICE (or RLIMIT_NICE), which
`probe_nice_restore` checks once at start-up: without it the threads are left alone, since a
guest left at nice 10 or SCHED_IDLE for good would be worse than a slower migration.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

from .realtime import probe_in_thread

MAX_NICE = 19

FIX = "give the daemon CAP_SYS_NICE (the unit's CapabilityBoundingSet=CAP_SYS_NICE, as root) or LimitNICE=40"


def probe_nice_restore() -> str | None:
    """None if a thread of this process can raise its nice value and lower it back, and go
    under SCHED_IDLE and back to its own policy, else why not. In a throwaway thread: the
    daemon's own threads keep their value."""

    def attempt() -> str | None:
        me = threading.get_native_id()
        start = os.getpriority(os.PRIO_PROCESS, me)
        try:
            os.setpriority(os.PRIO_PROCESS, me, min(start + 1, MAX_NICE))
            os.setpriority(os.PRIO_PROCESS, me, start)
        except OSError as err:
            return f"setpriority back to nice {start}: {err.strerror}"
        policy = os.sched_getscheduler(me)
        try:
            os.sched_setscheduler(me, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(me, policy, os.sched_param(0))
        except OSError as err:
            return f"sched_setscheduler from SCHED_IDLE back to policy {policy}: {err.strerror}"
        return None

    return probe_in_thread(attempt, "nice-probe")


# Policies a vCPU thread may be taken from to SCHED_IDLE: the fair ones. A real-time or idle
# thread is the operator's choice and is left as it is.
_FAIR = (os.SCHED_OTHER, os.SCHED_BATCH)


class YieldingVcpus:
    """The vCPU threads of one migrating VM at `nice`, and under SCHED_IDLE until `wake`
    (`sched_idle`), until `restore`.

    Thread ids are kernel ids (`Vcpu.thread_id`): on Linux the nice value and the policy are per
    thread, and setpriority(PRIO_PROCESS, tid) changes that thread alone. A thread already at
    `nice` or above keeps its value, and one under a policy other than SCHED_OTHER or
    SCHED_BATCH keeps its policy; neither is restored."""

    def __init__(self, nice: int, sched_idle: bool = False) -> None:
        if not 0 <= nice <= MAX_NICE:
            raise ValueError(f"vCPU nice {nice}: allowed are 0 to {MAX_NICE}")
        self.nice = nice
        self.sched_idle = sched_idle
        self._nice_before: dict[int, int] = {}  # thread id -> the nice value it had
        self._policy_before: dict[int, int] = {}  # thread id -> its policy before SCHED_IDLE
        self.went_idle = False  # a thread went under SCHED_IDLE in this migration

    @property
    def enabled(self) -> bool:
        return bool(self.nice) or self.sched_idle

    @property
    def lowered(self) -> bool:
        """Some thread is at `nice` now because of this (not restored yet)."""
        return bool(self._nice_before)

    @property
    def threads(self) -> int:
        """Threads whose nice value or policy this changed, and has not restored."""
        return len(self._nice_before.keys() | self._policy_before.keys())

    def lower(self, thread_ids: Iterable[int | None]) -> list[str]:
        """Each thread to `nice`, and under SCHED_IDLE (`sched_idle`); returns the errors (a
        thread that ended is not one)."""
        errors = []
        for tid in thread_ids:
            if tid is None or tid in self._nice_before or tid in self._policy_before:
                continue
            try:
                before = os.getpriority(os.PRIO_PROCESS, tid)
                if self.nice > before:
                    os.setpriority(os.PRIO_PROCESS, tid, self.nice)
                    self._nice_before[tid] = before
                if self.sched_idle:
                    policy = os.sched_getscheduler(tid)
                    if policy & ~os.SCHED_RESET_ON_FORK in _FAIR:
                        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                        self._policy_before[tid] = policy
                        self.went_idle = True
            except ProcessLookupError:
                continue
            except OSError as err:
                errors.append(f"thread {tid}: {err.strerror}")
        return errors

    def wake(self, alive: Iterable[int | None]) -> list[str]:
        """Every thread under SCHED_IDLE that is still one of `alive` back to its own policy;
        its nice value stays `nice` (until `restore`). Idempotent."""
        errors = []
        still = set(alive)
        for tid, policy in self._policy_before.items():
            if tid not in still:
                continue
            try:
                # The nice value is not the policy's: it stays what `lower` made it.
                os.sched_setscheduler(tid, policy, os.sched_param(0))
            except ProcessLookupError:
                continue
            except OSError as err:
                errors.append(f"thread {tid}: {err.strerror}")
        self._policy_before.clear()
        return errors

    def restore(self, alive: Iterable[int | None]) -> list[str]:
        """Every changed thread that is still one of `alive` (the VM's vCPU threads now) back to
        its policy and value, the others forgotten: a thread id is reused once its thread has
        ended, and a released VM's must not reach another thread. Idempotent."""
        still = set(alive)
        errors = self.wake(still)
        for tid, before in self._nice_before.items():
            if tid not in still:
                continue
            try:
                os.setpriority(os.PRIO_PROCESS, tid, before)
            except ProcessLookupError:
                continue
            except OSError as err:
                errors.append(f"thread {tid}: {err.strerror}")
        self._nice_before.clear()
        return errors
