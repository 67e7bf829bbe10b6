"""How an arm64 VM is built: RAM at RAM_BASE above the GIC's MMIO frames, and once every vCPU
exists KVM_ARM_VCPU_INIT on each, then the vGIC v3 and its ITS (`...setup_machine`)."""

from __future__ import annotations

from typing import Any

from ...backing import RamBacking
from ...errors import KvmCapabilityError
from ...memory import GuestMemory
from ...saved_state import RestoreReport
from ...system import HostCaps, Kvm
from ...vcpu import Vcpu
from ...vm import Vm, VmConfig
from .devices import RAM_BASE, guest_memory, save_its_tables, setup_machine
from .state import Arm64MachineState, restore_vm_state, save_vm_state


class Aarch64:
    name = "aarch64"
    ram_base = RAM_BASE
    state_kind = "arm64-machine"
    flat_state_kind: str | None = None  # the map form only: an arm64 vCPU's registers are ONE_REG pairs
    boots_raw_images = False

    def check_config(self, config: VmConfig, caps: HostCaps, tracking: str) -> None:
        if tracking == "ring" and not caps.dirty_ring_with_bitmap:
            raise KvmCapabilityError(
                "dirty tracking 'ring' on arm64 needs KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, which "
                "this kernel does not offer: the vGIC ITS writes guest RAM with no vCPU running "
                "and only the backup bitmap sees it; use 'bitmap'"
            )

    def guest_memory(self, size: int, name: str, backing: RamBacking | None = None) -> GuestMemory:
        return guest_memory(size, name, backing)

    def before_vcpus(self, vm: Vm, config: VmConfig) -> None:
        return None

    def before_vcpus_of(self, vm: Vm, config: VmConfig) -> None:
        return None

    def setup_vcpu(self, vm: Vm, vcpu: Vcpu) -> None:
        return None  # KVM_ARM_VCPU_INIT needs every vCPU first (after_vcpus)

    def after_vcpus(self, vm: Vm) -> None:
        setup_machine(vm)

    def cpu_features(self, kvm: Kvm) -> dict[str, object]:
        # KVM_ARM_PREFERRED_TARGET is the generic target on every current host; what differs
        # between hosts is checked register by register when the state is restored.
        return {"cpu_arch": "aarch64"}

    def vm_features(self, vm: Vm) -> dict[str, object]:
        return {}

    def prepare_state_save(self, vm: Vm) -> None:
        """R6.3 on arm64: the LPI pending tables and the ITS tables go into guest RAM first, with
        no vCPU running (EBUSY otherwise); only the backup bitmap sees those writes, and the
        caller collects it after the state (R6.4)."""
        save_its_tables(vm)

    def save_state(self, vm: Vm) -> dict[str, Any]:
        return save_vm_state(vm).to_wire()

    def save_flat_state(self, vm: Vm) -> bytes:
        raise ValueError("arm64 machine state has no flat form (flat_state_kind is None)")

    def restore_flat_state(self, vm: Vm, record: bytes) -> RestoreReport:
        raise ValueError("arm64 machine state has no flat form (flat_state_kind is None)")

    def rehearse_flat_restore(self, vm: Vm) -> float:
        raise ValueError("arm64 machine state has no flat form (flat_state_kind is None)")

    def restore_state(self, vm: Vm, wire: object) -> RestoreReport:
        # R9: memory is in place; restore_vm_state follows arm-vgic-its.rst's order.
        return restore_vm_state(vm, Arm64MachineState.from_wire(wire))
