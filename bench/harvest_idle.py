"""The continuous harvester's cost while guests run, JSON on stdout: this checkout against a
reference checkout (`--reference-repo`, e.g. a worktree of the commit before), interleaved.

Each round runs, in a fresh process per checkout, `--vms` VMs of one vCPU with the workload guest
rewriting `--working-set-mib` (continuous mode) at full speed or at `--rate-mib-s`, and measures
over `--seconds`:
- the harvester threads' CPU (utime + stime of their /proc task, summed over the VMs), as a
  percentage of one CPU;
- the guest's pages written per second (its own counter): what a harvest's re-protection costs
  the guest, in write faults;
- the harvests (KVM_RESET_DIRTY_RINGS calls) per second.

    python bench/harvest_idle.py --reference-repo /work/ref [--vms 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _task_cpu_s(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(repo: str, vms: int, working_set_mib: int, rate_mib_s: float, seconds: float) -> dict[str, Any]:
    """Runs in the checkout under test: imports come from `repo`."""
    sys.path.insert(0, repo)
    from contextlib import ExitStack

    from migrated.guests.workload import WorkloadParams
    from migrated.guests.x86_64.boot import load_workload
    from migrated.kvm.arch import create_vm
    from migrated.kvm.system import Kvm
    from migrated.kvm.vm import VmConfig

    with ExitStack() as stack:
        kvm = stack.enter_context(Kvm.open())
        machines = []
        for _ in range(vms):
            vm = stack.enter_context(create_vm(kvm, VmConfig(memory_bytes=64 << 20, vcpus=1, dirty_tracking="ring")))
            guest = load_workload(vm, WorkloadParams(vcpus=1, working_set_bytes=working_set_mib << 20))
            if rate_mib_s > 0:
                guest.set_rate(vm.write_guest, rate_mib_s)
            vm.start()
            machines.append((vm, guest))
        time.sleep(1.0)  # past the start-up: every guest writing, every harvester waiting

        # Each VM's harvester thread and tracker, as they are while it runs (ring mode).
        harvesters = [vm._harvester.native_id for vm, _ in machines if vm._harvester is not None]
        trackers = [vm.tracker for vm, _ in machines if vm.tracker is not None]
        if len(harvesters) != vms or len(trackers) != vms or None in harvesters:
            raise RuntimeError("a VM runs without a harvester: this bench needs ring mode")

        def sample() -> tuple[float, int, int, float]:
            cpu = sum(_task_cpu_s(tid) for tid in harvesters if tid is not None)
            written = sum(s.pages_written for vm, guest in machines for s in guest.status(vm.ram))
            resets = sum(tracker.stats.resets for tracker in trackers)
            return cpu, written, resets, time.monotonic()

        cpu0, written0, resets0, t0 = sample()
        time.sleep(seconds)
        cpu1, written1, resets1, t1 = sample()
        for vm, guest in machines:
            vm.pause()
            report = guest.verify(vm.ram)
            if not report.ok:
                raise RuntimeError(f"guest memory failed verification: {report}")
    elapsed = t1 - t0
    return {
        "harvester_cpu_percent": round((cpu1 - cpu0) / elapsed * 100, 2),
        "guest_pages_written_per_s": round((written1 - written0) / elapsed),
        "harvests_per_s": round((resets1 - resets0) / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-repo", required=True, help="a checkout to compare against (built)")
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--working-set-mib", type=int, default=1)
    parser.add_argument("--rate-mib-s", type=float, default=0.0, help="0: full speed")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.vms, args.working_set_mib, args.rate_mib_s, args.seconds)))
        return
    repos = {"this": str(HERE.parents[1]), "reference": str(Path(args.reference_repo).resolve())}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in repos}
    for _ in range(args.rounds):
        for name, repo in repos.items():  # interleaved: the host's state drifts between rounds
            command = [sys.executable, str(HERE), "--reference-repo", repo, "--child", repo]
            command += ["--vms", str(args.vms), "--working-set-mib", str(args.working_set_mib)]
            command += ["--rate-mib-s", str(args.rate_mib_s), "--seconds", str(args.seconds)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    result: dict[str, Any] = {
        "vms": args.vms,
        "working_set_mib": args.working_set_mib,
        "rate_mib_s": args.rate_mib_s or "full speed",
        "load_average": os.getloadavg()[0],
    }
    for name, measured in runs.items():
        result[name] = {
            key: {"median": statistics.median(m[key] for m in measured), "runs": [m[key] for m in measured]}
            for key in measured[0]
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
