"""The target's VM build after ACCEPT, from scratch and from a warm shell (migrated/vmshell.py),
side by side and interleaved in one process. Prints JSON.

    python3 bench/vm_shell.py [--reps N] [--memory-mib M] [--vcpus V]

Each repetition builds the incoming VM as the target does (`create_incoming` around RAM made
beforehand, threads started parked): once with everything from KVM_CREATE_VM on, once from an
empty VM made ahead (`create_empty`, not timed: the daemon makes it before the migration), in
alternating order. Also timed alone: making the shell itself. Medians, with min and max, in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrated.hosted import VmSpec, create_incoming, vm_config  # noqa: E402
from migrated.kvm.arch import create_empty, guest_memory  # noqa: E402
from migrated.kvm.system import Kvm  # noqa: E402
from migrated.kvm.vcpu import ensure_kick_handler  # noqa: E402
from migrated.kvm.vm import Vm  # noqa: E402


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {"median_ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3)}


def build(kvm: Kvm, spec: VmSpec, shell: Vm | None) -> float:
    config = vm_config(spec, "auto", 1 << 20, 1.0)
    ram = guest_memory(kvm, config)
    started = time.perf_counter()
    hosted = create_incoming(kvm, spec, config, None, True, ram, shell)
    elapsed = time.perf_counter() - started
    hosted.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="builds of each kind (default: 30)")
    parser.add_argument("--memory-mib", type=int, default=150, help="guest RAM (default: 150)")
    parser.add_argument("--vcpus", type=int, default=1, help="vCPUs (default: 1)")
    args = parser.parse_args()
    ensure_kick_handler()
    spec = VmSpec(name="bench", memory_mib=args.memory_mib, vcpus=args.vcpus, guest="none", working_set_mib=1)
    fresh: list[float] = []
    warm: list[float] = []
    make: list[float] = []
    with Kvm.open() as kvm:
        build(kvm, spec, None)  # first calls (imports, CPUID query) out of the figures
        for rep in range(args.reps):
            started = time.perf_counter()
            shell = create_empty(kvm, vm_config(spec, "auto", 1 << 20, 1.0))
            make.append(time.perf_counter() - started)
            order = [("fresh", None), ("shell", shell)]
            for kind, given in order if rep % 2 else reversed(order):
                (fresh if kind == "fresh" else warm).append(build(kvm, spec, given))
    print(
        json.dumps(
            {
                "memory_mib": args.memory_mib,
                "vcpus": args.vcpus,
                "reps": args.reps,
                "build_fresh": summary(fresh),
                "build_from_shell": summary(warm),
                "make_shell": summary(make),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
