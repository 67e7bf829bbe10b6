"""The x86_64 arch object: how a VM is built (flat RAM from guest-physical 0, the in-kernel
irqchip and PIT before the vCPUs, which KVM_CREATE_IRQCHIP requires, the supported CPUID on every
vCPU) and how its machine state travels (`state.py`)."""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

from ...backing import RamBacking
from ...memory import GuestMemory
from ...saved_state import RestoreReport
from ...system import HostCaps, Kvm, cpuid_buffer
from ...vcpu import Vcpu
from ...vm import Vm, VmConfig
from .cpu import cpuid_buffer_of
from .devices import create_irqchip, create_pit2, detect_devices
from .fixed import (
    LEGACY_XSAVE_BYTES,
    cpuid_of,
    host_facts,
    read_build_refused_msrs,
    read_build_tsc_khz,
    set_cpuid,
    vm_xsave2_bytes,
)
from .flatstate import rehearse_restore, restore_flat, save_flat
from .state import X86MachineState, restore_vm_state, save_vm_state
from .statebuffers import MIN_XSAVE_BYTES, restore_plan, save_plan, vm_devices_plan

# The CPUID table a VM under construction gives each vCPU (VmConfig.cpuid), from
# `before_vcpus_of` to `after_vcpus`.
_BUILD_CPUID: weakref.WeakKeyDictionary[Vm, ctypes.Array[ctypes.c_uint8]] = weakref.WeakKeyDictionary()


class X86_64:
    name = "x86_64"
    ram_base = 0
    state_kind = "x86-machine"  # the DeviceState kind its machine state travels as
    flat_state_kind: str | None = "x86-machine-flat"  # flatstate.py
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
        detect_devices(vm)  # known from here on: a state save or restore asks no more (devices.py)

    def before_vcpus_of(self, vm: Vm, config: VmConfig) -> None:
        # Not in `before_vcpus`: a warm shell (vmshell.py) ran that before the description came.
        if config.cpuid:
            _BUILD_CPUID[vm] = cpuid_buffer_of(config.cpuid)

    def setup_vcpu(self, vm: Vm, vcpu: Vcpu) -> None:
        """The CPUID the VM was built for (a target: the source's, from the VM description, so
        that the restore finds it set and leaves it), else the host's supported one."""
        table = _BUILD_CPUID.get(vm)
        set_cpuid(vcpu, table if table is not None else cpuid_buffer(vm.kvm.supported_cpuid()))

    def after_vcpus(self, vm: Vm) -> None:
        # Built with a given table: a target (the description's), whose restore uses the probe.
        target = _BUILD_CPUID.pop(vm, None) is not None
        # Read now rather than in a downtime (fixed.py), and the state's buffers made now
        # (statebuffers.py), in the shapes this host's states have.
        host = host_facts(vm.kvm)
        xsave2 = vm_xsave2_bytes(vm)
        irqchip, pit = detect_devices(vm)
        for way in ("GET", "SET"):
            vm_devices_plan(vm, way, irqchip, pit)
        for vcpu in vm.vcpus:
            read_build_tsc_khz(vcpu)
            save_plan(vcpu, irqchip, xsave2, host.msr_indices)
            restore_plan(vcpu, irqchip, max(xsave2, MIN_XSAVE_BYTES), len(host.msr_indices))
            if target:
                read_build_refused_msrs(vcpu, host.msr_indices)

    def cpu_features(self, kvm: Kvm) -> dict[str, object]:
        """What a target compares before it accepts a VM: the same CPU vendor, family, model,
        and (`migration.vmstate.incompatibility`) every MSR a state carries known there."""
        host = host_facts(kvm)
        model = host.cpu_model
        return {
            "cpu_vendor": model.vendor,
            "cpu_family": model.family,
            "cpu_model": model.model,
            "msr_indices": list(host.msr_indices),
        }

    def vm_features(self, vm: Vm) -> dict[str, object]:
        """The CPUID table of every vCPU, where they share one read when it was set (fixed.py):
        the target builds its vCPUs with it, and its restore finds it set. The XSAVE size a state
        of this VM carries, for the target to check before it accepts."""
        features: dict[str, object] = {"xsave_bytes": max(vm_xsave2_bytes(vm), LEGACY_XSAVE_BYTES)}
        tables = {cpuid_of(vcpu) for vcpu in vm.vcpus}
        if len(tables) == 1:
            (table,) = tables
            if table is not None:
                features["vcpu_cpuid"] = list(table)
        return features

    def prepare_state_save(self, vm: Vm) -> None:
        return None  # nothing of the x86 machine lives in guest RAM

    def save_state(self, vm: Vm) -> dict[str, Any]:
        irqchip, pit = detect_devices(vm)
        return save_vm_state(vm, irqchip=irqchip, pit=pit).to_wire()

    def save_flat_state(self, vm: Vm) -> bytes:
        irqchip, pit = detect_devices(vm)
        return save_flat(vm, irqchip=irqchip, pit=pit)

    def restore_flat_state(self, vm: Vm, record: bytes) -> RestoreReport:
        return restore_flat(vm, record)

    def rehearse_flat_restore(self, vm: Vm) -> float:
        return rehearse_restore(vm)

    def restore_state(self, vm: Vm, wire: object) -> RestoreReport:
        state = X86MachineState.from_wire(wire)
        # The target built the same devices from the same spec (hosted.vm_config); checked again
        # against the state by restore_vm_state.
        irqchip, pit = detect_devices(vm)
        return restore_vm_state(vm, state, irqchip=irqchip, pit=pit)
