"""`make demo`: a workload VM on real KVM, its dirty pages harvested and copied as they change.

Until the daemons migrate between each other, this shows the part they stand on: the guest writes
at full speed on every vCPU, the ring harvester keeps up, every collection's pages are copied into
a second buffer (as a migration would send them), and after a final pause-and-collect the copy
equals guest RAM byte for byte and the guest's own checks found no error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from .guests.boot import load_workload
from .guests.workload import WorkloadParams
from .kvm.errors import KvmError
from .kvm.memory import PAGE_SIZE
from .kvm.system import Kvm
from .kvm.vm import Vm, VmConfig

MIB = 1 << 20


def run(args: argparse.Namespace) -> dict[str, object]:
    rate = math.inf if args.dirty_rate == "max" else float(args.dirty_rate)
    config = VmConfig(
        memory_bytes=args.memory * MIB, vcpus=args.vcpus, dirty_tracking=args.dirty_tracking
    )
    params = WorkloadParams(
        vcpus=args.vcpus, working_set_bytes=args.working_set * MIB, dirty_rate_mib_s=rate
    )
    with Kvm.open() as kvm, Vm.create(kvm, config) as vm:
        assert vm.tracker is not None
        guest = load_workload(vm, params)
        copy = np.zeros_like(vm.ram)
        pages_view, copy_view = vm.ram.reshape(-1, PAGE_SIZE), copy.reshape(-1, PAGE_SIZE)
        copied = 0

        def collect_and_copy() -> int:
            dirty = vm.tracker.collect().by_slot[0].astype(np.intp)  # type: ignore[union-attr]
            copy_view[dirty] = pages_view[dirty]
            return int(dirty.size)

        vm.start()
        started = time.monotonic()
        next_report = started + 0.5
        while (now := time.monotonic()) < started + args.seconds:
            copied += collect_and_copy()
            if now >= next_report:
                status = guest.status(vm.ram)
                print(
                    f"t={now - started:4.1f}s pages_written={sum(s.pages_written for s in status)} "
                    f"pages_copied={copied} ring_full_exits={vm.tracker.stats.ring_full_exits} "
                    f"heartbeats={[s.heartbeat for s in status]}",
                    file=sys.stderr,
                )
                next_report += 0.5
            time.sleep(0.002)
        pause_started = time.perf_counter()
        vm.pause()
        copied += collect_and_copy()
        pause_ms = (time.perf_counter() - pause_started) * 1e3
        differing = int(np.count_nonzero((copy_view != pages_view).any(axis=1)))
        report = guest.verify(vm.ram)
        status = guest.status(vm.ram)
        return {
            "dirty_tracking": vm.dirty_tracking,
            "vcpus": args.vcpus,
            "seconds": args.seconds,
            "pages_written_by_guest": sum(s.pages_written for s in status),
            "pages_copied": copied,
            "collections": vm.tracker.stats.collections,
            "ring_full_exits": vm.tracker.stats.ring_full_exits,
            "pause_and_final_collect_ms": round(pause_ms, 3),
            "pages_differing_from_copy": differing,
            "guest_verify_errors": sum(s.verify_errors for s in status),
            "memory_check": "ok" if report.ok and differing == 0 else "FAILED",
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migrated.demo", description=__doc__)
    parser.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--working-set", type=int, default=128, help="MiB")
    parser.add_argument("--dirty-rate", default="max", help="MiB/s, or 'max'")
    parser.add_argument("--dirty-tracking", default="auto", choices=["auto", "ring", "bitmap"])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (KvmError, ValueError) as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0 if result["memory_check"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
