"""Harvest cost, JSON on stdout: the shim against pure Python, and ring against bitmap by guest size.

1. Entries/s of the C shim's harvest loop against the same loop in pure Python
   (`bench/harvest_shim.py`, a synthetic 65,536-entry ring).
2. The cost of one complete harvest through our Python API (`tracker.collect()`: until the page
   set is in hand and tracking is re-armed) in ring mode and in bitmap mode, for guests of 1, 16
   and 256 GiB (sparse: RAM is allocated only where touched), with the workload guest rewriting the
   same 16 MiB between harvests (passes mode: one pass, then the guest waits). The continuous
   harvester is held off so each collection finds the whole 16 MiB in the rings. Median of
   `--repeat` harvests after one warm-up.

    python bench/harvest.py [--sizes-gib 1 16 256] [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harvest_shim import measure_entries_per_s  # noqa: E402

from migrated.guests.x86_64.boot import load_workload  # noqa: E402
from migrated.guests.workload import WorkloadGuest, WorkloadParams  # noqa: E402
from migrated.kvm.system import Kvm  # noqa: E402
from migrated.kvm.arch import create_vm
from migrated.kvm.vm import DirtyTrackingMode, Vm, VmConfig  # noqa: E402

GIB = 1 << 30
DIRTIED = 16 << 20


def _wait_pass(vm: Vm, guest: WorkloadGuest, target: int) -> None:
    deadline = time.monotonic() + 30
    while min(guest.passes_done(vm.ram)) < target:
        if time.monotonic() > deadline or any(v.error for v in vm.vcpus):
            raise RuntimeError(f"guest pass {target} did not finish: {guest.status(vm.ram)}")
        time.sleep(0.0005)


def measure_collect_ms(kvm: Kvm, size_gib: int, mode: DirtyTrackingMode, repeat: int) -> dict[str, Any]:
    config = VmConfig(
        memory_bytes=size_gib * GIB,
        vcpus=1,
        dirty_tracking=mode,
        harvest_interval_s=3600.0,
    )
    params = WorkloadParams(vcpus=1, working_set_bytes=DIRTIED, mode="passes")
    with create_vm(kvm, config) as vm:
        assert vm.tracker is not None
        guest = load_workload(vm, params)
        vm.start()
        timings = []
        pages = []
        for i in range(repeat + 1):
            _wait_pass(vm, guest, guest.request_pass(vm.write_guest, vm.ram))
            started = time.perf_counter()
            collected = vm.tracker.collect()
            elapsed = time.perf_counter() - started
            if i:  # the first collection also holds the loader's own writes
                timings.append(elapsed * 1e3)
                pages.append(collected.count)
        vm.pause()
        report = guest.verify(vm.ram)
        if not report.ok:
            raise RuntimeError(f"guest memory failed verification: {report}")
    return {"median_ms": statistics.median(timings), "pages": statistics.median(pages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gib", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    result: dict[str, Any] = dict(measure_entries_per_s())
    result["shim_speedup"] = result["shim_entries_per_s"] / result["python_entries_per_s"]
    ring: dict[str, float] = {}
    bitmap: dict[str, float] = {}
    pages: dict[str, dict[str, float]] = {}
    with Kvm.open() as kvm:
        for size in args.sizes_gib:
            r = measure_collect_ms(kvm, size, "ring", args.repeat)
            b = measure_collect_ms(kvm, size, "bitmap", args.repeat)
            ring[str(size)], bitmap[str(size)] = r["median_ms"], b["median_ms"]
            pages[str(size)] = {"ring": r["pages"], "bitmap": b["pages"]}
    result.update(
        ring_harvest_ms=ring,
        bitmap_harvest_ms=bitmap,
        pages_per_harvest=pages,
        dirtied_mib_between_harvests=DIRTIED >> 20,
    )
    small, large = str(min(args.sizes_gib)), str(max(args.sizes_gib))
    result["targets"] = {
        "shim_at_least_20x_python": result["shim_speedup"] >= 20,
        "ring_at_most_tenth_of_bitmap_at_largest": ring[large] <= bitmap[large] / 10,
        "ring_largest_within_1_5x_of_smallest": ring[large] <= 1.5 * ring[small],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
