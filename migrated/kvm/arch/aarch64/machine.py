"""How an arm64 VM is built: RAM at RAM_BASE above the GIC's MMIO frames, and once every vCPU
exists KVM_ARM_VCPU_INIT on each, then the vGIC v3 and its ITS (`...aarch64.setup_machine`)."""

from __future__ import annotations

from ... import aarch64
from ...errors import KvmCapabilityError
from ...memory import GuestMemory
from ...system import HostCaps
from ...vcpu import Vcpu
from ...vm import Vm, VmConfig


class Aarch64:
    name = "aarch64"
    ram_base = aarch64.RAM_BASE

    def check_config(self, config: VmConfig, caps: HostCaps, tracking: str) -> None:
        if tracking == "ring" and not caps.dirty_ring_with_bitmap:
            raise KvmCapabilityError(
                "dirty tracking 'ring' on arm64 needs KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, which "
                "this kernel does not offer: the vGIC ITS writes guest RAM with no vCPU running "
                "and only the backup bitmap sees it; use 'bitmap'"
            )

    def guest_memory(self, size: int, name: str) -> GuestMemory:
        return aarch64.guest_memory(size, name=name)

    def before_vcpus(self, vm: Vm, config: VmConfig) -> None:
        return None

    def setup_vcpu(self, vm: Vm, vcpu: Vcpu) -> None:
        return None  # KVM_ARM_VCPU_INIT needs every vCPU first (after_vcpus)

    def after_vcpus(self, vm: Vm) -> None:
        aarch64.setup_machine(vm)
