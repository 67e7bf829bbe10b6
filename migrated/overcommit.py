"""Overcommit: what a new VM would make this daemon's VMs ask of the host.

Past the host's size (RAM from /proc/meminfo, CPUs this process may run on) a VM is created with
a warning; past `vm.max_memory_overcommit` / `vm.max_vcpu_overcommit` times the host's size it is
refused. Guest RAM is sparse, so memory overcommit costs nothing until the guests touch their
pages, and then it costs the host's other memory or an OOM kill of the daemon with every VM in it:
the operator decides how far to go. The same check runs for a VM created here and for one
migrated in, against the VMs already on this daemon.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MEMINFO = Path("/proc/meminfo")


class OvercommitRefused(Exception):
    """The VM would take the daemon past a configured overcommit factor; the message says which."""


@dataclass(frozen=True, slots=True)
class HostSize:
    memory_mib: int
    cpus: int


def host_size(meminfo: Path = MEMINFO) -> HostSize:
    memory_kib = 0
    with open(meminfo) as file:
        for line in file:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
                break
    if memory_kib <= 0:
        raise RuntimeError(f"{meminfo} has no MemTotal line")
    return HostSize(memory_mib=memory_kib // 1024, cpus=len(os.sched_getaffinity(0)))


@dataclass(frozen=True, slots=True)
class Demand:
    """One VM's share of the host: guest RAM in MiB and vCPUs."""

    memory_mib: int
    vcpus: int


def check_overcommit(
    name: str,
    new: Demand,
    present: Iterable[Demand],
    host: HostSize,
    max_memory_overcommit: float,
    max_vcpu_overcommit: float,
) -> list[str]:
    """Warnings for a VM that takes the daemon past the host's size; raises OvercommitRefused
    past a factor. `present`: the VMs the daemon holds now (not counting `new`)."""
    others = list(present)
    memory = new.memory_mib + sum(d.memory_mib for d in others)
    vcpus = new.vcpus + sum(d.vcpus for d in others)
    checks = (
        ("guest memory", f"{memory} MiB", memory / host.memory_mib, f"{host.memory_mib} MiB of RAM", "memory"),
        ("vCPUs", f"{vcpus} vCPUs", vcpus / host.cpus, f"{host.cpus} CPUs", "vcpu"),
    )
    warnings = []
    for what, total, ratio, size, key in checks:
        limit = max_memory_overcommit if key == "memory" else max_vcpu_overcommit
        said = f"VM {name}: this daemon's VMs would have {total}, {ratio:.2f} times the host's {size}"
        if ratio > limit:
            raise OvercommitRefused(
                f"{said}; vm.max_{key}_overcommit allows {limit:g} times: refused (stop a VM, "
                f"make this one smaller, or raise vm.max_{key}_overcommit)"
            )
        if ratio > 1:
            warnings.append(f"{said} ({what} overcommitted; vm.max_{key}_overcommit = {limit:g})")
    return warnings
