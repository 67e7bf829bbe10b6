"""Guest RAM backings side by side (memfd, shmem-huge, hugetlbfs), cold and warm; JSON out.

For each backing, interleaved round by round so that the machine's load falls on all alike:
- `fresh_write`: a new RAM file of --fresh-mib filled in 1 MiB blocks by one thread, through
  the mapping (page faults, as the target's apply path does today) and with pwrite (what a
  data plane writing into the RAM file does; hugetlbfs refuses write(2): null). The time counts
  creating the file too: hugetlbfs takes all its pages there.
- `guest_dirty_rate`: the workload guest at full speed over --guest-ws-mib, its rings harvested
  every millisecond as during a migration, after two warm-up sweeps.
- `migration`: a paused, all-non-zero guest of --migrate-mib from a memfd daemon into a freshly
  started target daemon with that backing (verify off, as the bulk copy is what differs).
"Cold": the measurement starts after --cold-wait-s with nothing allocated; this machine is a
guest itself and hands memory it has not used for a few seconds back to its host, so the first
touch pays for the host backing it again (HOST-NOTES "Fresh memory on this host"). "Warm": right
after the same amount was written and freed, as on a host in service.

Needs root (mounts a huge-page tmpfs, reserves huge pages through /proc/sys/vm/nr_hugepages and
restores the old value).

    python bench/backing.py [--fresh-mib 1024] [--migrate-mib 512] [--rounds 2] [--cold-wait-s 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "migration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.py

from daemons import DaemonProcess, wait_for, wait_migration  # noqa: E402
from helpers import huge_tmpfs, hugetlb_pool  # noqa: E402

MIB = 1 << 20
BACKINGS = ("memfd", "shmem-huge", "hugetlbfs")
TEMPERATURES = ("cold", "warm")


def fresh_write_mib_s(kind: str, ram_dir: Path, size: int, method: str) -> float | None:
    import numpy as np

    from migrated.kvm.backing import RamBacking
    from migrated.kvm.memory import GuestMemory

    backing = RamBacking(kind, str(ram_dir) if kind == "shmem-huge" else "")  # type: ignore[arg-type]
    if method == "pwrite" and not backing.writable_by_fd:
        return None
    block = np.random.default_rng(1).integers(1, 255, MIB, dtype=np.uint8)
    payload = block.tobytes()
    started = time.perf_counter()
    memory = GuestMemory.flat(size, name="bench-ram", backing=backing)
    try:
        region = memory.regions[0]
        fd, base = memory.fd_for(region), memory.file_offset(region)
        for offset in range(0, size, MIB):
            if method == "mapping":
                memory.bytes[offset : offset + MIB] = block
            else:
                os.pwrite(fd, payload, base + offset)
        return size / MIB / (time.perf_counter() - started)
    finally:
        memory.close()


def guest_dirty_rate_mib_s(kind: str, ram_dir: Path, ws_mib: int, seconds: float) -> dict[str, Any]:
    from migrated.guests.x86_64.boot import load_workload
    from migrated.guests.workload import WorkloadParams
    from migrated.kvm.arch import create_vm
    from migrated.kvm.backing import RamBacking
    from migrated.kvm.system import Kvm
    from migrated.kvm.vm import VmConfig

    backing = RamBacking(kind, str(ram_dir) if kind == "shmem-huge" else "")  # type: ignore[arg-type]
    config = VmConfig(memory_bytes=(ws_mib + 8) * MIB, dirty_tracking="ring", memory_backing=backing)
    with Kvm.open() as kvm, create_vm(kvm, config) as vm:
        guest = load_workload(vm, WorkloadParams(vcpus=1, working_set_bytes=ws_mib * MIB, dirty_rate_mib_s=math.inf))
        vm.start()
        wait_for(lambda: min(s.sweep for s in guest.status(vm.ram)) >= 2, 60, "two warm-up sweeps")
        before, t0 = guest.status(vm.ram), time.perf_counter()
        time.sleep(seconds)  # the measuring window
        after, t1 = guest.status(vm.ram), time.perf_counter()
        vm.pause()
        ok = guest.verify(vm.ram).ok and not any(v.error for v in vm.vcpus)
    pages = sum(b.pages_written - a.pages_written for a, b in zip(before, after))
    return {"mib_s": pages * 4096 / MIB / (t1 - t0), "verified": ok}


def prepare_source(work: Path, key: Path, memory_mib: int) -> dict[str, Any]:
    """The source daemon (memfd) with a paused guest whose every page is written."""
    config = work / "src.toml"
    config.write_text('[vm]\nmemory_backing = "memfd"\n')
    source = DaemonProcess("src", work, key, extra_args=("--config", str(config))).start()
    try:
        working_set = memory_mib - 8
        source.call(
            "vm.create", name="bench", memory_mib=memory_mib, dirty_rate_mib_s="max", working_set_mib=working_set
        )
        wait_for(
            lambda: source.call("vm.show", name="bench")["guest"]["pages_written"] >= working_set * MIB // 4096,
            120,
            "the guest to write its whole working set",
        )
        source.call("vm.pause", name="bench")
        return {"source": source, "memory_mib": memory_mib}
    except BaseException:
        source.stop()
        raise


def run_migration(prepared: dict[str, Any], kind: str, work: Path, key: Path) -> dict[str, Any]:
    source: DaemonProcess = prepared["source"]
    config = work / f"dst-{kind}.toml"
    config.write_text(f'[vm]\nmemory_backing = "{kind}"\n')
    target = DaemonProcess(f"dst-{kind}", work, key, extra_args=("--config", str(config))).start()
    try:
        source.call("migrate", name="bench", to=target.address, verify="off")
        stats = wait_migration(source, "bench", timeout=300)
        if stats["state"] != "completed":
            raise RuntimeError(f"migration into {kind} did not complete: {stats}")
        # Back to the source for the next run (its own backing: memfd).
        target.call("migrate", name="bench", to=source.address, verify="off")
        back = wait_migration(target, "bench", timeout=300)
        if back["state"] != "completed":
            raise RuntimeError(f"migration back did not complete: {back}")
        return {
            "bulk_mib_s": stats["bulk_bytes"] / MIB / (stats["bulk_ms"] / 1e3),
            "total_ms": stats["total_ms"],
            "downtime_ms": stats["downtime_ms"],
        }
    finally:
        target.stop()


def warm(kind: str, ram_dir: Path, size: int) -> None:
    """Write and free `size` bytes of this backing: the memory the measurement gets next is warm."""
    fresh_write_mib_s(kind, ram_dir, size, "mapping")


def summary(values: list[float | None]) -> dict[str, Any] | None:
    numbers = [v for v in values if v is not None]
    if not numbers:
        return None
    return {
        "median": round(statistics.median(numbers), 1),
        "min": round(min(numbers), 1),
        "max": round(max(numbers), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh-mib", type=int, default=1024, help="RAM file size for the fresh-write figures")
    parser.add_argument("--migrate-mib", type=int, default=512, help="guest size for the migrations")
    parser.add_argument("--guest-ws-mib", type=int, default=256, help="working set of the dirty-rate guest")
    parser.add_argument("--guest-seconds", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of everything")
    parser.add_argument("--cold-wait-s", type=float, default=5.0, help="idle time before a cold measurement")
    parser.add_argument("--backings", nargs="+", default=list(BACKINGS), choices=BACKINGS)
    args = parser.parse_args()
    fresh = args.fresh_mib * MIB
    # One hugetlbfs user at a time: a fresh file (its warm-up is freed first), a target VM, the guest.
    pages_needed = max(fresh, args.migrate_mib * MIB, (args.guest_ws_mib + 8) * MIB) // (2 * MIB) + 4
    results: dict[str, dict[str, dict[str, list[Any]]]] = {
        kind: {t: {"mapping": [], "pwrite": [], "migration": []} for t in TEMPERATURES} for kind in args.backings
    }
    rates: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.backings}
    with tempfile.TemporaryDirectory(prefix="migrated-bench-") as tmp:
        work = Path(tmp)
        key = work / "peer.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        with huge_tmpfs(work / "ram") as ram_dir, hugetlb_pool(pages_needed) as free_pages:
            if "hugetlbfs" in args.backings and free_pages < pages_needed:
                raise SystemExit(f"only {free_pages} of {pages_needed} huge pages could be reserved")
            prepared = prepare_source(work, key, args.migrate_mib)
            try:
                for _ in range(args.rounds):
                    for kind in args.backings:
                        for temperature in TEMPERATURES:
                            for method in ("mapping", "pwrite"):
                                if temperature == "cold":
                                    time.sleep(args.cold_wait_s)  # idle: the host takes the memory back
                                else:
                                    warm(kind, ram_dir, fresh)
                                value = fresh_write_mib_s(kind, ram_dir, fresh, method)
                                results[kind][temperature][method].append(value)
                            if temperature == "cold":
                                time.sleep(args.cold_wait_s)
                            else:
                                warm(kind, ram_dir, args.migrate_mib * MIB)
                            results[kind][temperature]["migration"].append(run_migration(prepared, kind, work, key))
                        rates[kind].append(guest_dirty_rate_mib_s(kind, ram_dir, args.guest_ws_mib, args.guest_seconds))
            finally:
                prepared["source"].stop()
    report: dict[str, Any] = {"benchmark": "backing", "cpus": os.cpu_count(), "args": vars(args), "backings": {}}
    for kind in args.backings:
        entry: dict[str, Any] = {
            "guest_dirty_rate_mib_s": summary([r["mib_s"] for r in rates[kind]]),
            "guest_verified": all(r["verified"] for r in rates[kind]),
        }
        for temperature in TEMPERATURES:
            runs = results[kind][temperature]
            entry[temperature] = {
                "fresh_write_mapping_mib_s": summary(runs["mapping"]),
                "fresh_write_pwrite_mib_s": summary(runs["pwrite"]),
                "migration_bulk_mib_s": summary([m["bulk_mib_s"] for m in runs["migration"]]),
                "migration_total_ms": summary([m["total_ms"] for m in runs["migration"]]),
                "runs": runs,
            }
        report["backings"][kind] = entry
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if all(e["guest_verified"] for e in report["backings"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
