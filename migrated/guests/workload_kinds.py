"""The workload guest on each architecture, behind one interface: where it places everything,
the VMM's view of it, how it is loaded. The daemon asks `workload_kind(arch)` and never
compares architecture names itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migrated.kvm.vm import Vm

from .aarch64 import boot as aarch64_boot
from .layout import MAX_MEMORY as X86_64_MAX_MEMORY
from .layout import plan_layout
from .workload import WorkloadGuest, WorkloadParams
from .x86_64 import boot as x86_64_boot


@dataclass(frozen=True)
class X86_64Workload:
    max_memory: int = X86_64_MAX_MEMORY  # what the guest's page tables map; the rest stays RAM
    runs_smallos: bool = True  # the small OS under the workload (x86_64/abi_smallos.h)

    def plan(self, memory_bytes: int, vcpus: int, working_set_bytes: int, smallos: bool) -> Any:
        return plan_layout(min(memory_bytes, self.max_memory), vcpus, working_set_bytes, smallos=smallos)

    def view(self, layout: Any) -> Any:
        return WorkloadGuest(layout)

    def load(self, vm: Vm, params: WorkloadParams) -> Any:
        return x86_64_boot.load_workload(vm, params)


@dataclass(frozen=True)
class Aarch64Workload:
    max_memory: int = aarch64_boot.MAX_MEMORY
    runs_smallos: bool = False

    def plan(self, memory_bytes: int, vcpus: int, working_set_bytes: int, smallos: bool) -> Any:
        return aarch64_boot.plan_layout_aarch64(min(memory_bytes, self.max_memory), vcpus, working_set_bytes)

    def view(self, layout: Any) -> Any:
        return aarch64_boot.Arm64WorkloadGuest(layout)

    def load(self, vm: Vm, params: WorkloadParams) -> Any:
        return aarch64_boot.load_workload_aarch64(vm, params)


WorkloadKind = X86_64Workload | Aarch64Workload
_KINDS: dict[str, WorkloadKind] = {"x86_64": X86_64Workload(), "aarch64": Aarch64Workload()}


def workload_kind(arch: str) -> WorkloadKind:
    """The workload guest for the architecture `arch` (an arch object's `name`)."""
    kind = _KINDS.get(arch)
    if kind is None:
        raise ValueError(f"no workload guest for architecture {arch!r}; there are {', '.join(sorted(_KINDS))}")
    return kind
