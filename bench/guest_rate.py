"""Maximum dirty rate of the workload guest (rate = unlimited), 1 and 2 vCPUs; JSON on stdout.

Each configuration runs twice in the same process: with the dirty ring harvested every
millisecond (as during a migration), and, as the reference, in bitmap mode with the log never
collected, so pages stay writable after their first write and the guest runs at its own speed.
After each run the VM is paused and the whole working set is checked (`verify_pages`).

    python bench/guest_rate.py [--vcpus 1 2] [--seconds 1.5] [--working-set-mib 256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrated.guests.workload import (  # noqa: E402
    WorkloadGuest,
    WorkloadParams,
    install,
    plan_layout,
)
from migrated.kvm.system import Kvm  # noqa: E402
from migrated.kvm.arch import create_vm
from migrated.kvm.vm import DirtyTrackingMode, Vm, VmConfig  # noqa: E402

MIB = 1 << 20


def _wait(vm: Vm, guest: WorkloadGuest, sweeps: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while min(s.sweep for s in guest.status(vm.ram)) < sweeps:
        if time.monotonic() > deadline or any(v.error for v in vm.vcpus):
            raise RuntimeError(f"guest did not warm up: {guest.status(vm.ram)} {[v.error for v in vm.vcpus]}")
        time.sleep(0.01)


def run(kvm: Kvm, vcpus: int, tracking: DirtyTrackingMode, seconds: float, ws_mib: int) -> dict[str, Any]:
    ws = ws_mib * MIB
    memory = ws + 8 * MIB
    layout = plan_layout(memory, vcpus, ws)
    params = WorkloadParams(vcpus=vcpus, working_set_bytes=ws, dirty_rate_mib_s=math.inf)
    config = VmConfig(memory_bytes=memory, vcpus=vcpus, dirty_tracking=tracking)
    with create_vm(kvm, config) as vm:
        for vcpu, (regs, sregs) in zip(vm.vcpus, install(vm.write_guest, layout, params, vm.tsc_khz())):
            vcpu.set_sregs(sregs)
            vcpu.set_regs(regs)
        guest = WorkloadGuest(layout)
        vm.start()
        # The first sweep also pays for the host allocating the memfd's pages: skip it.
        _wait(vm, guest, sweeps=2, timeout=30)
        assert vm.tracker is not None
        entries0 = vm.tracker.stats.entries_harvested
        full0 = vm.tracker.stats.ring_full_exits
        before, t0 = guest.status(vm.ram), time.perf_counter()
        time.sleep(seconds)
        after, t1 = guest.status(vm.ram), time.perf_counter()
        entries = vm.tracker.stats.entries_harvested - entries0
        full = vm.tracker.stats.ring_full_exits - full0
        vm.pause()
        report = guest.verify(vm.ram)
        final = guest.status(vm.ram)
        errors = [str(v.error) for v in vm.vcpus if v.error is not None]
    elapsed = t1 - t0
    per_vcpu = [(b.pages_written - a.pages_written) / elapsed for a, b in zip(before, after)]
    total = sum(per_vcpu)
    return {
        "vcpus": vcpus,
        "tracking": tracking,
        "working_set_mib": ws_mib,
        "seconds": round(elapsed, 3),
        "pages_per_s": round(total),
        "mib_per_s": round(total * 4096 / MIB, 1),
        "pages_per_s_per_vcpu": [round(x) for x in per_vcpu],
        "ring_entries_per_s": round(entries / elapsed) if tracking == "ring" else None,
        "ring_full_exits": full if tracking == "ring" else None,
        "guest_verify_errors": sum(s.verify_errors for s in final),
        "verify_pages_ok": report.ok,
        "bad_pages": report.bad_pages,
        "vcpu_errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vcpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--working-set-mib", type=int, default=256)
    parser.add_argument("--tracking", nargs="+", default=["ring", "bitmap"], choices=["ring", "bitmap"])
    args = parser.parse_args()
    with Kvm.open() as kvm:
        caps = kvm.caps()
        runs = [
            run(kvm, vcpus, tracking, args.seconds, args.working_set_mib)
            for vcpus in args.vcpus
            for tracking in args.tracking
        ]
    result = {
        "benchmark": "guest_rate",
        "host": {"pvm": caps.pvm, "cpus": os.cpu_count()},
        "note": "bitmap = reference: log never collected, so the guest's own speed",
        "runs": runs,
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if all(r["verify_pages_ok"] and not r["vcpu_errors"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
