"""Can the ring harvester run at SCHED_FIFO? Asked once at start-up, so the answer is in the log
before any VM exists instead of only in `vm show --json` after a migration went wrong.

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

HARVESTER_PRIORITY = 1

COST_WITHOUT_REALTIME = (
    "the dirty-ring harvester runs as a normal thread: on a busy host it can be kept off the CPU "
    "for 100 ms and more, a ring can fill, and on PVM hosts a full ring under emulated guest code "
    "livelocks the vCPU and fails the migration"
)
FIX = (
    "give the daemon CAP_SYS_NICE (CapabilityBoundingSet=CAP_SYS_NICE) or RLIMIT_RTPRIO >= 1 "
    "(LimitRTPRIO=1), and drop RestrictRealtime=yes from its unit"
)


def probe_realtime() -> str | None:
    """None if a thread of this process may switch to SCHED_FIFO at the harvester's priority,
    else why not. The probe runs in a thread of its own, which ends at once: no thread of the
    daemon keeps a real-time policy it did not ask for."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(HARVESTER_PRIORITY))
        except OSError as err:
            outcome.append(f"sched_setscheduler(SCHED_FIFO, {HARVESTER_PRIORITY}): {err.strerror}")
            return
        outcome.append(None)

    probe = threading.Thread(target=attempt, name="realtime-probe")
    probe.start()
    probe.join()
    return outcome[0] if outcome else "the probe thread ended without an answer"
