"""The migrating guest's vCPU threads yield the CPU to the migration (`migration.vcpu_nice`).

On a host whose cores are all busy, the source's migration threads (event loop, page streams)
wait for a core behind the guest's own vCPUs, and every step of the setup and the copy takes
longer; the guest keeps dirtying meanwhile. Measured here (bench/fixed_cost.py, the boot-sector
guest keeping one of two cores busy, 4 interleaved rounds of 6 migrations): total 32-43 ms at
nice 0, 27-40 ms at nice 10. A nice value only matters when threads compete: on a host with idle
cores the guest runs as fast as before, so this is a throttle that costs the guest nothing unless
the migration needs the CPU.

The vCPU threads go back to the value they had when the migration ends without cutover (the VM
runs here again). Going back to a lower nice value needs CAP_SYS_NICE (or RLIMIT_NICE), which
`probe_nice_restore` checks once at start-up: without it the threads are left alone, since a
guest left at nice 10 for good would be worse than a slower migration.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

from .realtime import probe_in_thread

MAX_NICE = 19

FIX = "give the daemon CAP_SYS_NICE (the unit's CapabilityBoundingSet=CAP_SYS_NICE, as root) or LimitNICE=40"


def probe_nice_restore() -> str | None:
    """None if a thread of this process can raise its nice value and lower it back, else why
    not. In a throwaway thread: the daemon's own threads keep their value."""

    def attempt() -> str | None:
        me = threading.get_native_id()
        start = os.getpriority(os.PRIO_PROCESS, me)
        try:
            os.setpriority(os.PRIO_PROCESS, me, min(start + 1, MAX_NICE))
            os.setpriority(os.PRIO_PROCESS, me, start)
        except OSError as err:
            return f"setpriority back to nice {start}: {err.strerror}"
        return None

    return probe_in_thread(attempt, "nice-probe")


class YieldingVcpus:
    """The vCPU threads of one migrating VM at `nice` until `restore`.

    Thread ids are kernel ids (`Vcpu.thread_id`): on Linux the nice value is per thread, and
    setpriority(PRIO_PROCESS, tid) changes that thread alone. A thread already at `nice` or
    above is left as it is and is not restored."""

    def __init__(self, nice: int) -> None:
        if not 0 <= nice <= MAX_NICE:
            raise ValueError(f"vCPU nice {nice}: allowed are 0 to {MAX_NICE}")
        self.nice = nice
        self._before: dict[int, int] = {}  # thread id -> the nice value it had

    @property
    def threads(self) -> int:
        return len(self._before)

    def lower(self, thread_ids: Iterable[int | None]) -> list[str]:
        """Each thread to `nice`; returns the errors (a thread that ended is not one)."""
        errors = []
        for tid in thread_ids:
            if tid is None or tid in self._before:
                continue
            try:
                before = os.getpriority(os.PRIO_PROCESS, tid)
                if before >= self.nice:
                    continue
                os.setpriority(os.PRIO_PROCESS, tid, self.nice)
            except ProcessLookupError:
                continue
            except OSError as err:
                errors.append(f"thread {tid}: {err.strerror}")
                continue
            self._before[tid] = before
        return errors

    def restore(self, alive: Iterable[int | None]) -> list[str]:
        """Every lowered thread that is still one of `alive` (the VM's vCPU threads now) back
        to its value, the others forgotten: a thread id is reused once its thread has ended, and
        a released VM's must not reach another thread. Idempotent."""
        errors = []
        still = set(alive)
        for tid, before in self._before.items():
            if tid not in still:
                continue
            try:
                os.setpriority(os.PRIO_PROCESS, tid, before)
            except ProcessLookupError:
                continue
            except OSError as err:
                errors.append(f"thread {tid}: {err.strerror}")
        self._before.clear()
        return errors
