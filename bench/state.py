"""Time to save and to restore the complete x86 state (vCPUs, irqchip, PIT, clock) of the
small-OS workload guest, 1 and 2 vCPUs, in-kernel irqchip and PIT on. Prints JSON.

    python3 bench/state.py [--reps N]

Then the same guest migrates between two daemons on loopback (verify = full), and the share of
the measured downtime that state save (source) plus restore (target) took is reported.

Each repetition: run the guest briefly, pause, `x86_64.save_vm_state`, copy RAM into a VM
built the same way, `restore_vm_state`, start it and check the guest's counters keep moving and
stay clean (so every timed restore is one that works). Medians, with min and max, in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrated.guests.x86_64.boot import load_workload  # noqa: E402
from migrated.guests.workload import WorkloadParams  # noqa: E402
from migrated.kvm.arch import x86_64  # noqa: E402
from migrated.kvm.system import Kvm  # noqa: E402
from migrated.kvm.vcpu import ensure_kick_handler  # noqa: E402
from migrated.kvm.arch import create_vm  # noqa: E402
from migrated.kvm.vm import Vm, VmConfig  # noqa: E402

MIB = 1 << 20
MEMORY = 64 * MIB


def build_vm(kvm: Kvm, vcpus: int, name: str, cpuid: tuple[bytes, ...] = ()) -> Vm:
    """Built as the daemon builds a VM (Vm.create: irqchip and PIT before the vCPUs, the host's
    facts read at the build); a target with the source's CPUID, as its VM description gives it."""
    config = VmConfig(memory_bytes=MEMORY, vcpus=vcpus, name=name, irqchip=True, pit=True, cpuid=cpuid)
    return create_vm(kvm, config)


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def one(kvm: Kvm, vcpus: int) -> tuple[float, float, dict[str, float], dict[str, float]]:
    params = WorkloadParams(vcpus=vcpus, working_set_bytes=8 * MIB, dirty_rate_mib_s=64, smallos=True)
    with build_vm(kvm, vcpus, "src") as vm:
        guest = load_workload(vm, params)
        vm.start()
        time.sleep(0.1)
        vm.pause()
        t0 = time.perf_counter()
        state = x86_64.save_vm_state(vm, irqchip=True, pit=True)
        save = time.perf_counter() - t0
        before = [s.smallos for s in guest.status(vm.ram)]
        with build_vm(kvm, vcpus, "dst", state.vcpus[0].cpuid) as target:
            target.ram[:] = vm.ram
            t0 = time.perf_counter()
            report = x86_64.restore_vm_state(target, state, irqchip=True, pit=True)
            restore = time.perf_counter() - t0
            target.start()
            time.sleep(0.05)
            target.pause()
            after = [s.smallos for s in guest.status(target.ram)]
            for a, b in zip(before, after):
                assert a is not None and b is not None
                assert b.ticks > a.ticks and b.reg_checks > a.reg_checks, (a, b)
                assert not b.errors, b
    return save, restore, state.timings, report.timings


def downtime_share(vcpus: int) -> dict[str, float]:
    """One daemon-to-daemon migration of the small OS: state save + restore vs downtime."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "migration"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.py
    from daemons import DaemonProcess, wait_for, wait_migration

    work = Path(tempfile.mkdtemp(prefix="migrated-bench-state-"))
    key = work / "peer.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    a = DaemonProcess("a", work, key).start()
    b = DaemonProcess("b", work, key).start()
    try:
        a.call(
            "vm.create",
            name="os",
            memory_mib=256,
            vcpus=vcpus,
            guest="smallos",
            dirty_rate_mib_s=32,
            working_set_mib=64,
        )
        wait_for(lambda: a.call("vm.show", name="os")["guest"]["smallos"]["reg_checks"] > 10)
        a.call("migrate", name="os", to=b.address)
        stats = wait_migration(a, "os")
        if stats["state"] != "completed":
            raise RuntimeError(f"migration failed: {stats['error']}")
        time.sleep(0.2)
        restore_ms = b.call("vm.show", name="os")["last_migration"]["state_save_ms"]
    finally:
        a.stop()
        b.stop()
    save_ms = stats["downtime_breakdown_ms"]["state_save"]
    return {
        "downtime_ms": stats["downtime_ms"],
        "state_save_ms": save_ms,
        "state_restore_ms": restore_ms,
        "share_of_downtime": (save_ms + restore_ms) / stats["downtime_ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    ensure_kick_handler()
    results = []
    with Kvm.open() as kvm:
        for vcpus in (1, 2):
            saves, restores = [], []
            save_steps: dict[str, list[float]] = {}
            restore_steps: dict[str, list[float]] = {}
            for _ in range(args.reps):
                save, restore, st, rt = one(kvm, vcpus)
                saves.append(save)
                restores.append(restore)
                for k, v in st.items():
                    save_steps.setdefault(k, []).append(v)
                for k, v in rt.items():
                    restore_steps.setdefault(k, []).append(v)
            results.append(
                {
                    "vcpus": vcpus,
                    "in_a_migration": downtime_share(vcpus),
                    "reps": args.reps,
                    "save": summary(saves),
                    "restore": summary(restores),
                    "save_steps_median_ms": {k: statistics.median(v) * 1e3 for k, v in save_steps.items()},
                    "restore_steps_median_ms": {k: statistics.median(v) * 1e3 for k, v in restore_steps.items()},
                }
            )
    print(
        json.dumps(
            {
                "bench": "x86 state save/restore, small-OS guest, irqchip + PIT",
                "host_pvm": os.path.exists("/sys/module/kvm_pvm"),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
