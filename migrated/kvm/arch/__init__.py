"""The architecture seam: everything that differs between x86_64 and arm64 is reached through the
object `host_arch()` returns; the rest of the daemon never compares architecture names.

`create_vm` is `Vm.create` with this host's architecture; `guest_memory` the RAM it would add.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from ..errors import KvmUnavailableError
from ..memory import GuestMemory
from ..saved_state import RestoreReport
from ..system import Kvm
from ..vm import Vm, VmArch, VmConfig
from .aarch64 import Aarch64
from .x86_64 import X86_64


class Arch(VmArch, Protocol):
    """An architecture as the daemon sees it: how its VMs are built (VmArch) and how their
    machine state leaves and enters a VM (DESIGN R6.3, R9)."""

    state_kind: str  # the DeviceState kind the machine state travels as
    # The kind of its flat form (one record of bytes, each vCPU's registers as one block), which
    # a target restores with less work in its downtime, or None; sent where the target offers it.
    flat_state_kind: str | None
    boots_raw_images: bool  # BIOS-style boot sectors and flat binaries (x86 only)

    def cpu_features(self, kvm: Kvm) -> dict[str, object]:
        """What a target compares with its own before it accepts a VM."""
        ...

    def vm_features(self, vm: Vm) -> dict[str, object]:
        """What of this VM's machine a target builds and checks with before it accepts it, so
        that its downtime need not (x86: the vCPUs' CPUID, the XSAVE size)."""
        ...

    def prepare_state_save(self, vm: Vm) -> None:
        """State the kernel writes into guest RAM, with every vCPU parked, before the registers."""
        ...

    def save_state(self, vm: Vm) -> dict[str, Any]:
        """The machine state in its map form, for msgpack."""
        ...

    def restore_state(self, vm: Vm, wire: object) -> RestoreReport:
        """`wire` as `save_state` gave it (through msgpack), after all memory (R9)."""
        ...

    def save_flat_state(self, vm: Vm) -> bytes:
        """The machine state in its flat form (only where `flat_state_kind` is not None)."""
        ...

    def restore_flat_state(self, vm: Vm, record: bytes) -> RestoreReport:
        """`record` as `save_flat_state` gave it, after all memory (R9)."""
        ...

    def rehearse_flat_restore(self, vm: Vm) -> float:
        """The flat restore up to its first write to KVM, on `vm`'s own state (a target that
        never ran), so that the real one runs warm; returns the seconds it took."""
        ...


ARCHES: dict[str, Arch] = {"x86_64": X86_64(), "aarch64": Aarch64()}


def host_arch(machine: str | None = None) -> Arch:
    """The architecture object for `machine` (default: this host's, from uname)."""
    name = machine or os.uname().machine
    arch = ARCHES.get(name)
    if arch is None:
        raise KvmUnavailableError(f"architecture {name!r}: this VMM supports {', '.join(sorted(ARCHES))}")
    return arch


def create_vm(kvm: Kvm, config: VmConfig, memory: GuestMemory | None = None, shell: Vm | None = None) -> Vm:
    """`memory`: RAM made beforehand for this config (`guest_memory`), the VM's once built.
    `shell`: an empty VM made ahead (`create_empty`) that the build goes on from."""
    return Vm.create(kvm, config, host_arch(kvm.caps().arch), memory, shell)


def create_empty(kvm: Kvm, config: VmConfig) -> Vm:
    """`Vm.create_empty` with this host's architecture: a warm shell (vmshell.py)."""
    return Vm.create_empty(kvm, config, host_arch(kvm.caps().arch))


def guest_memory(kvm: Kvm, config: VmConfig) -> GuestMemory:
    """The RAM a VM of `config` gets on this host, before the VM exists: a target receives the
    pages into it while the VM is built (`create_vm(kvm, config, memory)`)."""
    return host_arch(kvm.caps().arch).guest_memory(config.memory_bytes, f"{config.name}-ram", config.memory_backing)


def arch_of(vm: Vm) -> Arch:
    return host_arch(vm.arch.name)
