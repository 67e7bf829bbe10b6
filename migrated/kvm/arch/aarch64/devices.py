"""What an arm64 VM has besides RAM and vCPUs, and how it is built: the guest-physical layout
(QEMU `virt` board places), KVM_ARM_VCPU_INIT once every vCPU exists, the vGIC v3 and its ITS
(Documentation/virt/kvm/devices/arm-vgic-v3.rst, arm-vgic-its.rst), SPI lines, and the tables
the vGIC writes into guest RAM (R6.3)."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Any

from ... import uapi
from . import uapi as arm_uapi
from ..._libc import ioctl
from ...backing import RamBacking
from ...errors import KvmCapabilityError, KvmIoctlError, VmConfigError
from ...memory import GuestMemory, MemoryRegion
from ...saved_state import (
    StateError,
)
from ...vm import Vm


GICD_BASE = 0x0800_0000  # distributor: "64K aligned and the region covers 64 KByte"


GICD_SIZE = 0x1_0000


ITS_BASE = 0x0808_0000  # ITS: "64K aligned and the region covers 128K"


ITS_SIZE = 0x2_0000


GICR_BASE = 0x080A_0000  # redistributors: "two 64K pages for each VCPU ... contiguous"


GICR_SIZE = 0x2_0000  # per vCPU


RAM_BASE = 0x4000_0000


# KVM_CREATE_VM with machine type 0 gives the default 40-bit IPA space (api.rst 4.2).
DEFAULT_IPA_BITS = 40


# Redistributors fill the gap between GICR_BASE and RAM.
MAX_REDISTRIBUTORS = (RAM_BASE - GICR_BASE) // GICR_SIZE


# SGIs, PPIs and SPIs: arm-vgic-v3.rst "ranging from 64 to 1024, in increments of 32".
NR_IRQS = 256


MIN_NR_IRQS = 64


MAX_NR_IRQS = 1024


VGIC_ADDR_UNDEF = (1 << 64) - 1  # what GRP_ADDR reads back before an address was set


class Device:
    """A KVM device fd (KVM_CREATE_DEVICE) and its attributes (api.rst 4.80, 4.81)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def _attr(self, step: str, request: int, group: int, attr: int, buf: Any) -> None:
        request_struct = uapi.kvm_device_attr(group=group, attr=attr, addr=0 if buf is None else ctypes.addressof(buf))
        try:
            ioctl(self.fd, request, request_struct)  # `buf` stays referenced until it returns
        except OSError as err:
            raise KvmIoctlError(f"{self.name}: {step}", err) from err

    def set(self, step: str, group: int, attr: int, value: int | None = None, bits: int = 64) -> None:
        buf = None if value is None else _int_buffer(value, bits)
        self._attr(f"KVM_SET_DEVICE_ATTR({step})", uapi.KVM_SET_DEVICE_ATTR, group, attr, buf)

    def get(self, step: str, group: int, attr: int, bits: int = 64) -> int:
        buf = _int_buffer(0, bits)
        self._attr(f"KVM_GET_DEVICE_ATTR({step})", uapi.KVM_GET_DEVICE_ATTR, group, attr, buf)
        return int(buf.value)

    def has(self, group: int, attr: int) -> bool:
        """KVM_HAS_DEVICE_ATTR: "A successful return indicates the attribute is implemented.
        It does not necessarily indicate that the attribute can be read or written in the
        device's current state." """
        try:
            self._attr("KVM_HAS_DEVICE_ATTR", uapi.KVM_HAS_DEVICE_ATTR, group, attr, None)
        except KvmIoctlError as err:
            if err.errno == errno.ENXIO:
                return False
            raise
        return True

    def ctrl(self, step: str, attr: int) -> None:
        self.set(step, arm_uapi.KVM_DEV_ARM_VGIC_GRP_CTRL, attr)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _int_buffer(value: int, bits: int) -> ctypes.c_uint32 | ctypes.c_uint64:
    if bits == 32:
        return ctypes.c_uint32(value & 0xFFFF_FFFF)
    return ctypes.c_uint64(value & (1 << 64) - 1)


def create_device(vm: Vm, dev_type: int, name: str) -> Device:
    """KVM_CREATE_DEVICE: "Creates an emulated device in the kernel. The file descriptor
    returned in fd can be used with KVM_SET/GET/HAS_DEVICE_ATTR." """
    request = uapi.kvm_create_device(type=dev_type)
    vm.ioctl(f"KVM_CREATE_DEVICE({name})", uapi.KVM_CREATE_DEVICE, request)
    return Device(int(request.fd), name)


@dataclass
class ArmMachine:
    """The vCPU configuration and the interrupt controller of one arm64 VM (`Vm.arm`)."""

    target: int = -1  # KVM_ARM_PREFERRED_TARGET
    features: int = 0  # features[0] of KVM_ARM_VCPU_INIT, without KVM_ARM_VCPU_POWER_OFF
    secondaries_off: bool = True
    vgic: Device | None = None
    its: Device | None = None
    nr_irqs: int = NR_IRQS
    initialized_vcpus: int = 0

    def close(self) -> None:
        for device in (self.its, self.vgic):
            if device is not None:
                device.close()
        self.its = self.vgic = None


def machine(vm: Vm) -> ArmMachine:
    arm = getattr(vm, "arm", None)
    if not isinstance(arm, ArmMachine):
        raise StateError("this VM is not an arm64 VM (Vm.arm is unset)")
    return arm


def guest_memory(size: int, name: str = "guest-ram", backing: RamBacking | None = None) -> GuestMemory:
    """Guest RAM for an arm64 guest: one region at RAM_BASE (memslot 0)."""
    limit = (1 << DEFAULT_IPA_BITS) - RAM_BASE
    if size > limit:
        raise VmConfigError(
            f"memory {size} bytes: an arm64 guest here has RAM from {RAM_BASE:#x} to the end of "
            f"the {DEFAULT_IPA_BITS}-bit IPA space, at most {limit} bytes"
        )
    return GuestMemory([MemoryRegion(slot=0, guest_phys_addr=RAM_BASE, size=size, offset=0)], name, backing)


def setup_machine(vm: Vm, *, its: bool = True, secondaries_off: bool = True) -> ArmMachine:
    """After every vCPU exists: KVM_ARM_VCPU_INIT on each, then the vGIC v3 and the ITS."""
    arm = vm.arm if isinstance(vm.arm, ArmMachine) else ArmMachine()
    vm.arm = arm
    init_vcpus(vm, secondaries_off=secondaries_off)
    create_vgic(vm)
    if its:
        create_its(vm)
    return arm


def preferred_target(vm: Vm) -> arm_uapi.kvm_vcpu_init:
    """KVM_ARM_PREFERRED_TARGET (api.rst 4.83): "This queries KVM for preferred CPU target type
    which can be emulated by KVM on underlying host. ... The kvm_vcpu_init->features bitmap
    returned will have feature bits set if the preferred target recommends setting these
    features, but this is not mandatory." """
    init = arm_uapi.kvm_vcpu_init()
    vm.ioctl("KVM_ARM_PREFERRED_TARGET", arm_uapi.KVM_ARM_PREFERRED_TARGET, init)
    return init


def vcpu_init_struct(target: int, features: int, index: int, secondaries_off: bool) -> arm_uapi.kvm_vcpu_init:
    init = arm_uapi.kvm_vcpu_init(target=target)
    init.features[0] = features
    if secondaries_off and index > 0:
        # api.rst: "KVM_ARM_VCPU_POWER_OFF: Starts the CPU in a power-off state. Depends on
        # KVM_CAP_ARM_PSCI." The guest starts it with PSCI CPU_ON, as firmware would.
        init.features[0] |= 1 << arm_uapi.KVM_ARM_VCPU_POWER_OFF
    return init


def init_vcpus(vm: Vm, *, secondaries_off: bool = True) -> None:
    """KVM_ARM_VCPU_INIT on every vCPU of `vm`, with PSCI 0.2 (api.rst 4.82).

    "This tells KVM what type of CPU to present to the guest, and what optional features it
    should have. This will cause a reset of the cpu registers to their initial values. If this
    is not called, KVM_RUN will return ENOEXEC for that vcpu." -- "Note that because some
    registers reflect machine topology, all vcpus should be created before this ioctl is
    invoked." So this runs once every vCPU exists, before the vGIC's CTRL_INIT.
    """
    arm = vm.arm if isinstance(vm.arm, ArmMachine) else ArmMachine()
    vm.arm = arm
    if not vm.vcpus:
        raise VmConfigError("KVM_ARM_VCPU_INIT needs the vCPUs created first")
    needed = [(uapi.KVM_CAP_ARM_PSCI_0_2, "KVM_CAP_ARM_PSCI_0_2", "KVM_ARM_VCPU_PSCI_0_2")]
    if secondaries_off and len(vm.vcpus) > 1:
        needed.append((uapi.KVM_CAP_ARM_PSCI, "KVM_CAP_ARM_PSCI", "KVM_ARM_VCPU_POWER_OFF"))
    for cap, cap_name, feature in needed:
        if vm.ioctl(f"KVM_CHECK_EXTENSION({cap_name})", uapi.KVM_CHECK_EXTENSION, cap) <= 0:
            raise KvmCapabilityError(f"this arm64 KVM lacks {cap_name}, which {feature} needs")
    preferred = preferred_target(vm)
    # "Emulate PSCI v0.2 (or a future revision backward compatible with v0.2) for the CPU."
    features = int(preferred.features[0]) | 1 << arm_uapi.KVM_ARM_VCPU_PSCI_0_2
    features &= ~(1 << arm_uapi.KVM_ARM_VCPU_POWER_OFF)
    arm.target, arm.features, arm.secondaries_off = int(preferred.target), features, secondaries_off
    for vcpu in vm.vcpus[arm.initialized_vcpus :]:
        init = vcpu_init_struct(arm.target, features, vcpu.index, secondaries_off)
        vcpu.ioctl("KVM_ARM_VCPU_INIT", arm_uapi.KVM_ARM_VCPU_INIT, init)
        arm.initialized_vcpus += 1


def create_vgic(vm: Vm, nr_irqs: int = NR_IRQS) -> Device:
    """The vGIC v3: distributor and redistributor addresses, NR_IRQS, then CTRL_INIT.

    arm-vgic-v3.rst: KVM_DEV_ARM_VGIC_CTRL_INIT "request the initialization of the VGIC, no
    additional parameter in kvm_device_attr.addr. Must be called after all VCPUs have been
    created." NR_IRQS goes before it: the kernel answers EBUSY once the vGIC is initialized
    ("-EBUSY Value has already be set"), and register access before it answers EBUSY too.
    """
    arm = machine(vm)
    if arm.vgic is not None:
        raise VmConfigError("this VM already has its vGIC")
    if not vm.vcpus or arm.initialized_vcpus != len(vm.vcpus):
        raise VmConfigError(
            "the vGIC comes after every vCPU was created and initialized (KVM_ARM_VCPU_INIT): "
            f"{len(vm.vcpus)} vCPU(s), {arm.initialized_vcpus} initialized"
        )
    if len(vm.vcpus) > MAX_REDISTRIBUTORS:
        raise VmConfigError(
            f"{len(vm.vcpus)} vCPUs: the redistributor region from {GICR_BASE:#x} to RAM at "
            f"{RAM_BASE:#x} holds {MAX_REDISTRIBUTORS}"
        )
    if not MIN_NR_IRQS <= nr_irqs <= MAX_NR_IRQS or nr_irqs % 32:
        raise VmConfigError(f"{nr_irqs} interrupts: from 64 to 1024, in increments of 32")
    vgic = create_device(vm, uapi.KVM_DEV_TYPE_ARM_VGIC_V3, "vgic-v3")
    arm.vgic = vgic  # owned by the VM from here on: Vm.close() closes it
    arm.nr_irqs = nr_irqs
    addr = arm_uapi.KVM_DEV_ARM_VGIC_GRP_ADDR
    vgic.set("distributor address", addr, arm_uapi.KVM_VGIC_V3_ADDR_TYPE_DIST, GICD_BASE)
    vgic.set("redistributor address", addr, arm_uapi.KVM_VGIC_V3_ADDR_TYPE_REDIST, GICR_BASE)
    # "A value describing the number of interrupts (SGI, PPI and SPI) for this GIC instance,
    # ranging from 64 to 1024, in increments of 32. kvm_device_attr.addr points to a __u32."
    vgic.set("NR_IRQS", arm_uapi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, nr_irqs, bits=32)
    vgic.ctrl("CTRL_INIT", arm_uapi.KVM_DEV_ARM_VGIC_CTRL_INIT)
    return vgic


def create_its(vm: Vm, address: int | None = ITS_BASE) -> Device:
    """The vGIC ITS: its base address (unless `address` is None: then `set_its_address` later,
    as a restore does in arm-vgic-its.rst's order), then CTRL_INIT.

    arm-vgic-its.rst: KVM_VGIC_ITS_ADDR_TYPE is the "Base address in the guest physical address
    space of the GICv3 ITS control register frame. This address needs to be 64K aligned and the
    region covers 128K." "Creating a virtual ITS controller also requires a host GICv3".
    """
    arm = machine(vm)
    if arm.vgic is None:
        raise VmConfigError("the ITS comes after the vGIC v3 (create_vgic)")
    if arm.its is not None:
        raise VmConfigError("this VM already has its ITS")
    its = create_device(vm, uapi.KVM_DEV_TYPE_ARM_VGIC_ITS, "vgic-its")
    arm.its = its
    if address is not None:
        set_its_address(vm, address)
    # "KVM_DEV_ARM_VGIC_CTRL_INIT request the initialization of the ITS, no additional
    # parameter in kvm_device_attr.addr."
    its.ctrl("CTRL_INIT", arm_uapi.KVM_DEV_ARM_VGIC_CTRL_INIT)
    return its


def set_its_address(vm: Vm, address: int = ITS_BASE) -> None:
    its = its_device(vm)
    its.set("ITS address", arm_uapi.KVM_DEV_ARM_VGIC_GRP_ADDR, arm_uapi.KVM_VGIC_ITS_ADDR_TYPE, address)


def its_address(vm: Vm) -> int | None:
    """The ITS base address KVM holds, or None before one was set."""
    value = its_device(vm).get("ITS address", arm_uapi.KVM_DEV_ARM_VGIC_GRP_ADDR, arm_uapi.KVM_VGIC_ITS_ADDR_TYPE)
    return None if value == VGIC_ADDR_UNDEF else value


def vgic_device(vm: Vm) -> Device:
    vgic = machine(vm).vgic
    if vgic is None:
        raise StateError("this VM has no vGIC (create_vgic)")
    return vgic


def its_device(vm: Vm) -> Device:
    its = machine(vm).its
    if its is None:
        raise StateError("this VM has no ITS (create_its)")
    return its


def set_spi_level(vm: Vm, intid: int, level: bool) -> None:
    """KVM_IRQ_LINE for an SPI (32 <= intid < NR_IRQS): api.rst 4.25, irq_type 1 (SPI) with the
    interrupt's number in the low 16 bits."""
    arm = machine(vm)
    if not 32 <= intid < arm.nr_irqs:
        raise ValueError(f"SPI {intid}: this vGIC has SPIs 32 to {arm.nr_irqs - 1}")
    irq = arm_uapi.KVM_ARM_IRQ_TYPE_SPI << arm_uapi.KVM_ARM_IRQ_TYPE_SHIFT | intid
    vm.ioctl(
        f"KVM_IRQ_LINE(SPI {intid})",
        uapi.KVM_IRQ_LINE,
        uapi.kvm_irq_level(irq=irq, level=int(level)),
    )


def save_its_tables(vm: Vm) -> None:
    """R6.3: KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES, then KVM_DEV_ARM_ITS_SAVE_TABLES.

    Call it after every vCPU parked and the final ring harvest, and before KVM_GET_DIRTY_LOG
    (R6.4): both write guest RAM with no vCPU running, so their pages show up only in the
    backup bitmap (api.rst 8.29: "One example of using the backup bitmap is saving arm64
    vgic/its tables through KVM_DEV_ARM_{VGIC_GRP_CTRL, ITS_SAVE_TABLES}"; arm-vgic-its.rst:
    "Should userspace require a form of dirty tracking to identify which pages are modified by
    the saving process, it should use a bitmap even if using another mechanism to track the
    memory dirtied by the vCPUs.").

    arm-vgic-v3.rst: SAVE_PENDING_TABLES "save all LPI pending bits into guest RAM pending
    tables". Both answer "-EBUSY One or more VCPUS are running" while a vCPU is in KVM_RUN:
    the KvmIoctlError then carries errno EBUSY.
    """
    arm = machine(vm)
    vgic_device(vm).ctrl("VGIC_SAVE_PENDING_TABLES", arm_uapi.KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES)
    if arm.its is not None:
        arm.its.ctrl("ITS_SAVE_TABLES", arm_uapi.KVM_DEV_ARM_ITS_SAVE_TABLES)
