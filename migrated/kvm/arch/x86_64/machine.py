"""How an x86_64 VM is built: flat RAM from guest-physical 0, the in-kernel irqchip and PIT
before the vCPUs (KVM_CREATE_IRQCHIP refuses after), the supported CPUID on every vCPU."""

from __future__ import annotations

from ... import x86_state
from ...memory import GuestMemory
from ...system import HostCaps, cpuid_buffer
from ...vcpu import Vcpu
from ...vm import Vm, VmConfig


class X86_64:
    name = "x86_64"
    ram_base = 0

    def check_config(self, config: VmConfig, caps: HostCaps, tracking: str) -> None:
        return None  # WITH_BITMAP is optional here (R7)

    def guest_memory(self, size: int, name: str) -> GuestMemory:
        return GuestMemory.flat(size, name=name)

    def before_vcpus(self, vm: Vm, config: VmConfig) -> None:
        if config.irqchip:
            x86_state.create_irqchip(vm)
        if config.pit:
            x86_state.create_pit2(vm)

    def setup_vcpu(self, vm: Vm, vcpu: Vcpu) -> None:
        vcpu.set_cpuid(cpuid_buffer(vm.kvm.supported_cpuid()))

    def after_vcpus(self, vm: Vm) -> None:
        return None
