"""The x86_64 arch object: how a VM is built (flat RAM from guest-physical 0, the in-kernel
irqchip and PIT before the vCPUs, which KVM_CREATE_IRQCHIP requires, the supported CPUID on every
vCPU) and how its machine state travels (`state.py`)."""

from __future__ import annotations

from typing import Any

from ...backing import RamBacking
from ...memory import GuestMemory
from ...system import HostCaps, Kvm, cpuid_buffer
from ...vcpu import Vcpu
from ...vm import Vm, VmConfig
from .cpu import CpuModel, cpu_identity
from .devices import create_irqchip, create_pit2, detect_devices
from .state import X86MachineState, restore_vm_state, save_vm_state


class X86_64:
    name = "x86_64"
    ram_base = 0
    state_kind = "x86-machine"  # the DeviceState kind its machine state travels as
    boots_raw_images = True  # BIOS-style boot sectors and flat binaries (guests/x86_64/raw.py)

    def check_config(self, config: VmConfig, caps: HostCaps, tracking: str) -> None:
        return None  # WITH_BITMAP is optional here (R7)

    def guest_memory(self, size: int, name: str, backing: RamBacking | None = None) -> GuestMemory:
        return GuestMemory.flat(size, name, backing)

    def before_vcpus(self, vm: Vm, config: VmConfig) -> None:
        if config.irqchip:
            create_irqchip(vm)
        if config.pit:
            create_pit2(vm)

    def setup_vcpu(self, vm: Vm, vcpu: Vcpu) -> None:
        vcpu.set_cpuid(cpuid_buffer(vm.kvm.supported_cpuid()))

    def after_vcpus(self, vm: Vm) -> None:
        return None

    def cpu_features(self, kvm: Kvm) -> dict[str, object]:
        """What a target compares before it accepts a VM: the same CPU vendor, family, model."""
        vendor, signature = cpu_identity(kvm.supported_cpuid())
        model = CpuModel.from_cpuid(vendor, signature)
        return {"cpu_vendor": model.vendor, "cpu_family": model.family, "cpu_model": model.model}

    def prepare_state_save(self, vm: Vm) -> None:
        return None  # nothing of the x86 machine lives in guest RAM

    def save_state(self, vm: Vm) -> dict[str, Any]:
        irqchip, pit = detect_devices(vm)
        return save_vm_state(vm, irqchip=irqchip, pit=pit).to_wire()

    def restore_state(self, vm: Vm, wire: object) -> None:
        state = X86MachineState.from_wire(wire)
        # The target built the same devices from the same spec (hosted.vm_config); checked again
        # against the state by restore_vm_state.
        irqchip, pit = detect_devices(vm)
        restore_vm_state(vm, state, irqchip=irqchip, pit=pit)
