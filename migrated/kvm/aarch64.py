"""arm64 (aarch64) KVM: vCPU init, ONE_REG, the vGIC v3 and its ITS, and the machine state.

What differs from x86 lives here; `vm.Vm` calls in at three points on aarch64 (guest RAM at
`RAM_BASE`, `setup_machine` once every vCPU exists, the device fds closed with the VM). The
machine's state is saved and restored here too, in the style of `x86_state`.

The orders this module keeps, each quoted next to the code that keeps it:

  creation  every vCPU created -> KVM_ARM_VCPU_INIT on each (api.rst 4.82: "all vcpus should be
            created before this ioctl is invoked") -> vGIC v3: distributor and redistributor
            addresses, NR_IRQS, CTRL_INIT ("Must be called after all VCPUs have been created")
            -> ITS: base address, CTRL_INIT.
  save      (R6.3, every vCPU parked) ONE_REG registers of every vCPU (KVM_GET_REG_LIST: core,
            system and timer registers), MP_STATE, VCPU_EVENTS; distributor, SPI line levels,
            per-vCPU redistributor and CPU interface registers; ITS registers. Separately, and
            where the migration puts it, `save_its_tables`: VGIC_SAVE_PENDING_TABLES, then
            ITS_SAVE_TABLES, which write guest RAM with no vCPU running.
  restore   (R9, arm-vgic-its.rst "ITS Restore Sequence") memory first (the caller's), vCPU
            registers, the distributor (GICD_IIDR first), redistributors, CPU interfaces, the ITS
            base address, GITS_CBASER, GITS_IIDR, GITS_CREADR, GITS_CWRITER, GITS_BASER<n>,
            ITS_RESTORE_TABLES, GITS_CTLR last.

Threads: like x86_state, every state call needs the vCPUs parked (`Vm.pause()`) or not started;
the vGIC answers EBUSY to most of them while a vCPU is in KVM_RUN anyway.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import uapi
from ._libc import ioctl
from .saved_state import (
    IncompatibleStateError,
    RestoreReport,
    StateError,
    StateFormatError,
    StepTimes,
    WireReader,
)
from .errors import KvmCapabilityError, KvmIoctlError, VmConfigError
from .memory import GuestMemory, MemoryRegion
from .vcpu import Vcpu
from .vcpu import VcpuRunState

if TYPE_CHECKING:
    from .vm import Vm

# --------------------------------------------------------------------------------------------
# Guest-physical layout (the same places as QEMU's `virt` board)
# --------------------------------------------------------------------------------------------
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

# Bounds on what a peer may send (DESIGN section 6).
MAX_VCPUS = 512  # KVM_MAX_VCPUS on arm64
MAX_REGS = 4096  # KVM_GET_REG_LIST gives a few hundred
MAX_REG_BYTES = 256  # KVM_REG_SIZE_U2048, the largest ONE_REG size


# --------------------------------------------------------------------------------------------
# Errors (the x86 module's have an "x86 state:" prefix; these say "arm64 state:")
# --------------------------------------------------------------------------------------------


# Wire checks shared with the other architecture's state (migrated/kvm/wire.py).
_W = WireReader("arm64 state")
_error, _mapping, _int_value, _int = _W.error, _W.mapping, _W.int_value, _W.int_field
_bytes_value, _bytes, _list = _W.bytes_value, _W.bytes_field, _W.list_field


# --------------------------------------------------------------------------------------------
# vCPU checks
# --------------------------------------------------------------------------------------------
def _require_parked(vcpus: Sequence[Vcpu], doing: str) -> None:
    for vcpu in vcpus:
        if vcpu.state is VcpuRunState.RUNNING:
            raise StateError(f"vCPU {vcpu.index} is running: pause the VM (Vm.pause) before {doing} its state")


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
        self.set(step, uapi.KVM_DEV_ARM_VGIC_GRP_CTRL, attr)

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


# --------------------------------------------------------------------------------------------
# The machine an arm64 VM owns besides memory and vCPUs
# --------------------------------------------------------------------------------------------
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


def guest_memory(size: int, name: str = "guest-ram") -> GuestMemory:
    """Guest RAM for an arm64 guest: one region at RAM_BASE (memslot 0)."""
    limit = (1 << DEFAULT_IPA_BITS) - RAM_BASE
    if size > limit:
        raise VmConfigError(
            f"memory {size} bytes: an arm64 guest here has RAM from {RAM_BASE:#x} to the end of "
            f"the {DEFAULT_IPA_BITS}-bit IPA space, at most {limit} bytes"
        )
    return GuestMemory([MemoryRegion(slot=0, guest_phys_addr=RAM_BASE, size=size, offset=0)], name)


def setup_machine(vm: Vm, *, its: bool = True, secondaries_off: bool = True) -> ArmMachine:
    """After every vCPU exists: KVM_ARM_VCPU_INIT on each, then the vGIC v3 and the ITS."""
    arm = vm.arm if isinstance(vm.arm, ArmMachine) else ArmMachine()
    vm.arm = arm
    init_vcpus(vm, secondaries_off=secondaries_off)
    create_vgic(vm)
    if its:
        create_its(vm)
    return arm


# --------------------------------------------------------------------------------------------
# vCPU init
# --------------------------------------------------------------------------------------------
def preferred_target(vm: Vm) -> uapi.kvm_vcpu_init:
    """KVM_ARM_PREFERRED_TARGET (api.rst 4.83): "This queries KVM for preferred CPU target type
    which can be emulated by KVM on underlying host. ... The kvm_vcpu_init->features bitmap
    returned will have feature bits set if the preferred target recommends setting these
    features, but this is not mandatory." """
    init = uapi.kvm_vcpu_init()
    vm.ioctl("KVM_ARM_PREFERRED_TARGET", uapi.KVM_ARM_PREFERRED_TARGET, init)
    return init


def vcpu_init_struct(target: int, features: int, index: int, secondaries_off: bool) -> uapi.kvm_vcpu_init:
    init = uapi.kvm_vcpu_init(target=target)
    init.features[0] = features
    if secondaries_off and index > 0:
        # api.rst: "KVM_ARM_VCPU_POWER_OFF: Starts the CPU in a power-off state. Depends on
        # KVM_CAP_ARM_PSCI." The guest starts it with PSCI CPU_ON, as firmware would.
        init.features[0] |= 1 << uapi.KVM_ARM_VCPU_POWER_OFF
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
    features = int(preferred.features[0]) | 1 << uapi.KVM_ARM_VCPU_PSCI_0_2
    features &= ~(1 << uapi.KVM_ARM_VCPU_POWER_OFF)
    arm.target, arm.features, arm.secondaries_off = int(preferred.target), features, secondaries_off
    for vcpu in vm.vcpus[arm.initialized_vcpus :]:
        init = vcpu_init_struct(arm.target, features, vcpu.index, secondaries_off)
        vcpu.ioctl("KVM_ARM_VCPU_INIT", uapi.KVM_ARM_VCPU_INIT, init)
        arm.initialized_vcpus += 1


# --------------------------------------------------------------------------------------------
# ONE_REG (api.rst 4.68, 4.69) and KVM_GET_REG_LIST (4.84)
# --------------------------------------------------------------------------------------------
def reg_size(reg_id: int) -> int:
    """KVM_REG_SIZE(id): the bytes a register's value takes."""
    return 1 << ((reg_id & uapi.KVM_REG_SIZE_MASK) >> uapi.KVM_REG_SIZE_SHIFT)


def _core_id(offset: int, size: int) -> int:
    # asm/kvm.h: KVM_REG_ARM_CORE_REG(name) is offsetof(struct kvm_regs, name) / sizeof(__u32);
    # api.rst: "The index is a 32bit value in the kvm_regs structure seen as a 32bit array".
    return uapi.KVM_REG_ARM64 | size | uapi.KVM_REG_ARM_CORE | offset // 4


def _core_registers() -> tuple[dict[str, int], dict[str, str]]:
    regs = uapi.kvm_regs_arm64
    pt = regs.regs.offset
    ids: dict[str, int] = {}
    members: dict[str, str] = {}
    for n in range(31):
        ids[f"X{n}"] = _core_id(pt + uapi.user_pt_regs.regs.offset + 8 * n, uapi.KVM_REG_SIZE_U64)
        members[f"X{n}"] = f"regs.regs[{n}]"
    for name, member in (("SP", "sp"), ("PC", "pc"), ("PSTATE", "pstate")):
        ids[name] = _core_id(pt + getattr(uapi.user_pt_regs, member).offset, uapi.KVM_REG_SIZE_U64)
        members[name] = f"regs.{member}"
    for name, member in (("SP_EL1", "sp_el1"), ("ELR_EL1", "elr_el1")):
        ids[name] = _core_id(getattr(regs, member).offset, uapi.KVM_REG_SIZE_U64)
        members[name] = member
    for n, name in enumerate(("SPSR_EL1", "SPSR_ABT", "SPSR_UND", "SPSR_IRQ", "SPSR_FIQ")):
        ids[name] = _core_id(regs.spsr.offset + 8 * n, uapi.KVM_REG_SIZE_U64)
        members[name] = f"spsr[{n}]"
    fp = regs.fp_regs.offset
    for n in range(32):
        offset = fp + uapi.user_fpsimd_state.vregs.offset + 16 * n
        ids[f"V{n}"] = _core_id(offset, uapi.KVM_REG_SIZE_U128)
        members[f"V{n}"] = f"fp_regs.vregs[{n}]"
    for name, member in (("FPSR", "fpsr"), ("FPCR", "fpcr")):
        offset = fp + getattr(uapi.user_fpsimd_state, member).offset
        ids[name] = _core_id(offset, uapi.KVM_REG_SIZE_U32)
        members[name] = f"fp_regs.{member}"
    return ids, members


# Core register ids by name (X0-X30, SP, PC, PSTATE, SP_EL1, ELR_EL1, SPSR_*, V0-V31, FPSR,
# FPCR), and the `struct kvm_regs` member each one stands for (checked against asm/kvm.h).
CORE_REGS, CORE_REG_MEMBERS = _core_registers()
_CORE_NAMES = {reg_id: name for name, reg_id in CORE_REGS.items()}

MPIDR_EL1 = uapi.arm64_sys_reg(3, 0, 0, 0, 5)
SCTLR_EL1 = uapi.arm64_sys_reg(3, 0, 1, 0, 0)
_SYSREG_NAMES = {
    MPIDR_EL1: "MPIDR_EL1",
    SCTLR_EL1: "SCTLR_EL1",
    uapi.KVM_REG_ARM_TIMER_CTL: "TIMER_CTL",
    uapi.KVM_REG_ARM_TIMER_CVAL: "TIMER_CVAL",
    uapi.KVM_REG_ARM_TIMER_CNT: "TIMER_CNT",
    uapi.KVM_REG_ARM_PTIMER_CTL: "PTIMER_CTL",
    uapi.KVM_REG_ARM_PTIMER_CVAL: "PTIMER_CVAL",
    uapi.KVM_REG_ARM_PTIMER_CNT: "PTIMER_CNT",
    uapi.KVM_REG_ARM_PSCI_VERSION: "PSCI_VERSION",
}
# Counters: they move between a save and the next read; a round trip compares all but these.
COUNTER_REGS = frozenset({uapi.KVM_REG_ARM_TIMER_CNT, uapi.KVM_REG_ARM_PTIMER_CNT})


def reg_name(reg_id: int) -> str:
    """A readable name for a ONE_REG id, for messages."""
    if reg_id in _CORE_NAMES:
        return _CORE_NAMES[reg_id]
    if reg_id in _SYSREG_NAMES:
        return _SYSREG_NAMES[reg_id]
    group = reg_id & uapi.KVM_REG_ARM_COPROC_MASK
    if group == uapi.KVM_REG_ARM64_SYSREG:
        fields = [
            (reg_id & mask) >> shift
            for mask, shift in (
                (uapi.KVM_REG_ARM64_SYSREG_OP0_MASK, uapi.KVM_REG_ARM64_SYSREG_OP0_SHIFT),
                (uapi.KVM_REG_ARM64_SYSREG_OP1_MASK, uapi.KVM_REG_ARM64_SYSREG_OP1_SHIFT),
                (uapi.KVM_REG_ARM64_SYSREG_CRN_MASK, uapi.KVM_REG_ARM64_SYSREG_CRN_SHIFT),
                (uapi.KVM_REG_ARM64_SYSREG_CRM_MASK, uapi.KVM_REG_ARM64_SYSREG_CRM_SHIFT),
                (uapi.KVM_REG_ARM64_SYSREG_OP2_MASK, uapi.KVM_REG_ARM64_SYSREG_OP2_SHIFT),
            )
        ]
        return "S{}_{}_C{}_C{}_{}".format(*fields)
    if group == uapi.KVM_REG_ARM_FW:
        return f"FW{reg_id & 0xFFFF}"
    if group == uapi.KVM_REG_ARM_FW_FEAT_BMAP:
        return f"FW_FEAT_BMAP{reg_id & 0xFFFF}"
    return f"register {reg_id:#x}"


def get_one_reg(vcpu: Vcpu, reg_id: int) -> bytes:
    """KVM_GET_ONE_REG (api.rst 4.69): "On success, the register value can be found at the
    memory location pointed to by "addr"." -- as many bytes as KVM_REG_SIZE(id)."""
    size = reg_size(reg_id)
    if size > MAX_REG_BYTES:
        raise StateError(f"vCPU {vcpu.index}: {reg_name(reg_id)} is {size} bytes wide")
    buf = (ctypes.c_uint8 * size)()
    request = uapi.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf))
    vcpu.ioctl(f"KVM_GET_ONE_REG({reg_name(reg_id)})", uapi.KVM_GET_ONE_REG, request)
    return bytes(buf)  # `buf` was referenced by this frame for the whole ioctl


def set_one_reg(vcpu: Vcpu, reg_id: int, value: bytes) -> None:
    """KVM_SET_ONE_REG (api.rst 4.68): "The register to set is indicated by the "id" field of
    the kvm_one_reg struct passed in. A value is passed in memory at "addr"." """
    size = reg_size(reg_id)
    if len(value) != size:
        raise StateError(f"vCPU {vcpu.index}: {reg_name(reg_id)} takes {size} bytes, got {len(value)}")
    buf = (ctypes.c_uint8 * size).from_buffer_copy(value)
    request = uapi.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf))
    vcpu.ioctl(f"KVM_SET_ONE_REG({reg_name(reg_id)})", uapi.KVM_SET_ONE_REG, request)


def get_reg(vcpu: Vcpu, reg: int | str) -> int:
    """A register (id, or a core register's name) as an unsigned little-endian integer."""
    reg_id = CORE_REGS[reg] if isinstance(reg, str) else reg
    return int.from_bytes(get_one_reg(vcpu, reg_id), "little")


def set_reg(vcpu: Vcpu, reg: int | str, value: int) -> None:
    """Set a register (id, or a core register's name; u32, u64 or u128 alike)."""
    reg_id = CORE_REGS[reg] if isinstance(reg, str) else reg
    size = reg_size(reg_id)
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"{reg_name(reg_id)} is {8 * size} bits wide; {value:#x} does not fit")
    set_one_reg(vcpu, reg_id, value.to_bytes(size, "little"))


def reg_list(vcpu: Vcpu) -> list[int]:
    """KVM_GET_REG_LIST (api.rst 4.84): "This ioctl returns the guest registers that are
    supported for the KVM_GET_ONE_REG/KVM_SET_ONE_REG calls." On E2BIG, "the number required
    will be written into n": grow to it and ask again."""
    count = 512
    while True:
        buf = (ctypes.c_uint64 * (1 + count))()
        buf[0] = count
        try:
            ioctl(vcpu.fd, uapi.KVM_GET_REG_LIST, buf)
        except OSError as err:
            needed = int(buf[0])
            if err.errno == errno.E2BIG and count < needed <= MAX_REGS:
                count = needed
                continue
            raise KvmIoctlError(f"vCPU {vcpu.index}: KVM_GET_REG_LIST", err) from err
        return [int(buf[1 + i]) for i in range(int(buf[0]))]


def mpidr(vcpu: Vcpu) -> int:
    return get_reg(vcpu, MPIDR_EL1)


def vgic_mpidr(mpidr_el1: int) -> int:
    """The mpidr field of a vGIC attribute: "| Aff3 | Aff2 | Aff1 | Aff0 |" in bits 63..32
    (arm-vgic-v3.rst); MPIDR_EL1 holds Aff3 in bits 39..32 and Aff2..Aff0 in bits 23..0."""
    return ((mpidr_el1 >> 32) & 0xFF) << 24 | (mpidr_el1 & 0xFF_FFFF)


def _cpu_attr(mpidr_el1: int, low: int) -> int:
    return vgic_mpidr(mpidr_el1) << uapi.KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT | low


# --------------------------------------------------------------------------------------------
# vGIC v3 and ITS creation (Documentation/virt/kvm/devices/arm-vgic-v3.rst, arm-vgic-its.rst)
# --------------------------------------------------------------------------------------------
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
    addr = uapi.KVM_DEV_ARM_VGIC_GRP_ADDR
    vgic.set("distributor address", addr, uapi.KVM_VGIC_V3_ADDR_TYPE_DIST, GICD_BASE)
    vgic.set("redistributor address", addr, uapi.KVM_VGIC_V3_ADDR_TYPE_REDIST, GICR_BASE)
    # "A value describing the number of interrupts (SGI, PPI and SPI) for this GIC instance,
    # ranging from 64 to 1024, in increments of 32. kvm_device_attr.addr points to a __u32."
    vgic.set("NR_IRQS", uapi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, nr_irqs, bits=32)
    vgic.ctrl("CTRL_INIT", uapi.KVM_DEV_ARM_VGIC_CTRL_INIT)
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
    its.ctrl("CTRL_INIT", uapi.KVM_DEV_ARM_VGIC_CTRL_INIT)
    return its


def set_its_address(vm: Vm, address: int = ITS_BASE) -> None:
    its = _its(vm)
    its.set("ITS address", uapi.KVM_DEV_ARM_VGIC_GRP_ADDR, uapi.KVM_VGIC_ITS_ADDR_TYPE, address)


def its_address(vm: Vm) -> int | None:
    """The ITS base address KVM holds, or None before one was set."""
    value = _its(vm).get("ITS address", uapi.KVM_DEV_ARM_VGIC_GRP_ADDR, uapi.KVM_VGIC_ITS_ADDR_TYPE)
    return None if value == VGIC_ADDR_UNDEF else value


def _vgic(vm: Vm) -> Device:
    vgic = machine(vm).vgic
    if vgic is None:
        raise StateError("this VM has no vGIC (create_vgic)")
    return vgic


def _its(vm: Vm) -> Device:
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
    irq = uapi.KVM_ARM_IRQ_TYPE_SPI << uapi.KVM_ARM_IRQ_TYPE_SHIFT | intid
    vm.ioctl(
        f"KVM_IRQ_LINE(SPI {intid})",
        uapi.KVM_IRQ_LINE,
        uapi.kvm_irq_level(irq=irq, level=int(level)),
    )


# --------------------------------------------------------------------------------------------
# The tables the vGIC keeps in guest RAM (DESIGN R6.3)
# --------------------------------------------------------------------------------------------
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
    _vgic(vm).ctrl("VGIC_SAVE_PENDING_TABLES", uapi.KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES)
    if arm.its is not None:
        arm.its.ctrl("ITS_SAVE_TABLES", uapi.KVM_DEV_ARM_ITS_SAVE_TABLES)


# --------------------------------------------------------------------------------------------
# GIC register maps (offsets from the GICv3 architecture; access rules from arm-vgic-v3.rst:
# "All distributor regs are (rw, 32-bit) ... 64-bit registers must be accessed by separately
# accessing the lower and higher word.")
# --------------------------------------------------------------------------------------------
GICD_CTLR = 0x0000
GICD_IIDR = 0x0008
GICD_IGROUPR = 0x0080
GICD_ISENABLER = 0x0100
GICD_ICENABLER = 0x0180
GICD_ISPENDR = 0x0200
GICD_ISACTIVER = 0x0300
GICD_ICACTIVER = 0x0380
GICD_IPRIORITYR = 0x0400
GICD_ICFGR = 0x0C00
GICD_IROUTER = 0x6000

GICR_CTLR = 0x0000
GICR_PROPBASER = 0x0070
GICR_PENDBASER = 0x0078
GICR_SGI_BASE = 0x1_0000
GICR_IGROUPR0 = GICR_SGI_BASE + 0x0080
GICR_ISENABLER0 = GICR_SGI_BASE + 0x0100
GICR_ICENABLER0 = GICR_SGI_BASE + 0x0180
GICR_ISPENDR0 = GICR_SGI_BASE + 0x0200
GICR_ISACTIVER0 = GICR_SGI_BASE + 0x0300
GICR_ICACTIVER0 = GICR_SGI_BASE + 0x0380
GICR_IPRIORITYR0 = GICR_SGI_BASE + 0x0400
GICR_ICFGR0 = GICR_SGI_BASE + 0x0C00
GICR_ICFGR1 = GICR_SGI_BASE + 0x0C04


def _spi_words(base: int, nr_irqs: int, bits_per_irq: int) -> list[int]:
    """Offsets of a per-IRQ register array's 32-bit words that cover the SPIs (32..nr_irqs):
    the first 32 interrupts are the redistributors' (RAZ/WI in the distributor)."""
    per_word = 32 // bits_per_irq
    return [base + 4 * (irq // per_word) for irq in range(32, nr_irqs, per_word)]


def dist_restore_order(nr_irqs: int) -> list[int]:
    """Every distributor register saved, in the order it is restored.

    GICD_IIDR first: arm-vgic-v3.rst "Userspace should set GICD_IIDR before setting any other
    registers to ensure the expected behavior." Then groups, priorities, routing and trigger
    configuration; enables, pending and active state after them; GICD_CTLR (enable) last.
    """
    return [
        GICD_IIDR,
        *_spi_words(GICD_IGROUPR, nr_irqs, 1),
        *_spi_words(GICD_IPRIORITYR, nr_irqs, 8),
        # GICD_IROUTER<n> is 64-bit: its lower and higher words one after the other.
        *(GICD_IROUTER + 8 * irq + half for irq in range(32, nr_irqs) for half in (0, 4)),
        *_spi_words(GICD_ICFGR, nr_irqs, 2),
        *_spi_words(GICD_ISENABLER, nr_irqs, 1),
        *_spi_words(GICD_ISPENDR, nr_irqs, 1),
        *_spi_words(GICD_ISACTIVER, nr_irqs, 1),
        GICD_CTLR,
    ]


def redist_restore_order() -> list[int]:
    """Every redistributor register saved (per vCPU), in the order it is restored.

    PROPBASER and PENDBASER before GICR_CTLR: KVM ignores writes to them once EnableLPIs is set
    ("Storing a value with LPIs already enabled is undefined"), and setting EnableLPIs reads the
    pending table from guest RAM (which is why memory comes first, R9).
    """
    return [
        GICR_PROPBASER,
        GICR_PROPBASER + 4,
        GICR_PENDBASER,
        GICR_PENDBASER + 4,
        GICR_IGROUPR0,
        *(GICR_IPRIORITYR0 + 4 * n for n in range(8)),
        GICR_ICFGR0,
        GICR_ICFGR1,
        GICR_ISENABLER0,
        GICR_ISPENDR0,
        GICR_ISACTIVER0,
        GICR_CTLR,
    ]


# "Set" registers whose architectural write only sets bits: restoring one clears first through
# its "clear" twin (uaccess writes of ICENABLER/ICACTIVER clear the bits written as 1).
# GICD_ISPENDR/GICR_ISPENDR0 are exact through this interface ("get/set the value of the latched
# pending state") and their ICPENDR twins are RAZ/WI, so they have none.
_CLEAR_TWIN = {GICR_ISENABLER0: GICR_ICENABLER0, GICR_ISACTIVER0: GICR_ICACTIVER0}


def _dist_clear_twin(offset: int) -> int | None:
    for set_base, clear_base in (
        (GICD_ISENABLER, GICD_ICENABLER),
        (GICD_ISACTIVER, GICD_ICACTIVER),
    ):
        if set_base <= offset < set_base + 0x80:
            return clear_base + offset - set_base
    return None


def _sysreg_instr(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    # arm-vgic-v3.rst, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS: "| Op 0 | Op1 | CRn | CRm | Op2 |"
    # in bits 15..14, 13..11, 10..7, 6..3, 2..0.
    return op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2


ICC_PMR_EL1 = _sysreg_instr(3, 0, 4, 6, 0)
ICC_BPR0_EL1 = _sysreg_instr(3, 0, 12, 8, 3)
ICC_AP0R_EL1 = tuple(_sysreg_instr(3, 0, 12, 8, 4 + n) for n in range(4))
ICC_AP1R_EL1 = tuple(_sysreg_instr(3, 0, 12, 9, n) for n in range(4))
ICC_BPR1_EL1 = _sysreg_instr(3, 0, 12, 12, 3)
ICC_CTLR_EL1 = _sysreg_instr(3, 0, 12, 12, 4)
ICC_SRE_EL1 = _sysreg_instr(3, 0, 12, 12, 5)
ICC_IGRPEN0_EL1 = _sysreg_instr(3, 0, 12, 12, 6)
ICC_IGRPEN1_EL1 = _sysreg_instr(3, 0, 12, 12, 7)
ICC_CTLR_PRIBITS_SHIFT = 8
ICC_NAMES = {
    ICC_PMR_EL1: "ICC_PMR_EL1",
    ICC_BPR0_EL1: "ICC_BPR0_EL1",
    **{reg: f"ICC_AP0R{n}_EL1" for n, reg in enumerate(ICC_AP0R_EL1)},
    **{reg: f"ICC_AP1R{n}_EL1" for n, reg in enumerate(ICC_AP1R_EL1)},
    ICC_BPR1_EL1: "ICC_BPR1_EL1",
    ICC_CTLR_EL1: "ICC_CTLR_EL1",
    ICC_SRE_EL1: "ICC_SRE_EL1",
    ICC_IGRPEN0_EL1: "ICC_IGRPEN0_EL1",
    ICC_IGRPEN1_EL1: "ICC_IGRPEN1_EL1",
}


def icc_restore_order(icc_ctlr: int) -> list[int]:
    """The CPU interface registers, in the order they are restored: SRE first (KVM refuses a
    write without its SRE bit), CTLR next (its PRIbits decide how many active-priority
    registers exist), the group enables last. ICC_AP<n>R<m>_EL1 exist for m < 1, 2 or 4 as
    the CPU interface implements 5, 6 or 7 priority bits (KVM answers EINVAL beyond)."""
    pri_bits = ((icc_ctlr >> ICC_CTLR_PRIBITS_SHIFT) & 0x7) + 1
    aprs = 4 if pri_bits >= 7 else 2 if pri_bits == 6 else 1
    return [
        ICC_SRE_EL1,
        ICC_CTLR_EL1,
        ICC_PMR_EL1,
        ICC_BPR0_EL1,
        ICC_BPR1_EL1,
        *ICC_AP0R_EL1[:aprs],
        *ICC_AP1R_EL1[:aprs],
        ICC_IGRPEN0_EL1,
        ICC_IGRPEN1_EL1,
    ]


GITS_CTLR = 0x0000
GITS_IIDR = 0x0004
GITS_CBASER = 0x0080
GITS_CWRITER = 0x0088
GITS_CREADR = 0x0090
GITS_BASER = tuple(0x0100 + 8 * n for n in range(8))
ITS_NAMES = {
    GITS_CTLR: "GITS_CTLR",
    GITS_IIDR: "GITS_IIDR",
    GITS_CBASER: "GITS_CBASER",
    GITS_CWRITER: "GITS_CWRITER",
    GITS_CREADR: "GITS_CREADR",
    **{reg: f"GITS_BASER{n}" for n, reg in enumerate(GITS_BASER)},
}
# arm-vgic-its.rst "ITS Restore Sequence": "1. Restore GITS_CBASER 2. Restore all other GITS_
# registers, except GITS_CTLR! 3. Load the ITS table data (KVM_DEV_ARM_ITS_RESTORE_TABLES)
# 4. Restore GITS_CTLR". Within step 2: GITS_IIDR "must be restored before calling
# KVM_DEV_ARM_ITS_RESTORE_TABLES" (its Revision field is the table ABI); GITS_CREADR "must be
# restored after GITS_CBASER since a write to GITS_CBASER resets GITS_CREADR".
ITS_REGS_BEFORE_TABLES = (GITS_CBASER, GITS_IIDR, GITS_CREADR, GITS_CWRITER, *GITS_BASER)
ITS_SAVED = frozenset((*ITS_REGS_BEFORE_TABLES, GITS_CTLR))


# --------------------------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------------------------
Pairs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Arm64VcpuState:
    """One vCPU: its registers (raw ONE_REG values), power state, pending SError, and its
    redistributor and CPU interface."""

    index: int
    mp_state: int  # KVM_MP_STATE_RUNNABLE, _STOPPED (powered off) or _SUSPENDED
    events: bytes  # arm64 struct kvm_vcpu_events
    regs: tuple[tuple[int, bytes], ...]  # (ONE_REG id, KVM_REG_SIZE(id) bytes), REG_LIST order
    redist: Pairs  # (GICR offset, u32)
    icc: Pairs  # (CPU_SYSREGS instr encoding, u64)

    def reg(self, reg: int | str) -> int | None:
        reg_id = CORE_REGS[reg] if isinstance(reg, str) else reg
        for i, value in self.regs:
            if i == reg_id:
                return int.from_bytes(value, "little")
        return None

    @property
    def mpidr(self) -> int:
        value = self.reg(MPIDR_EL1)
        assert value is not None  # from_wire and save both insist on it
        return value

    def to_wire(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "mp_state": self.mp_state,
            "events": self.events,
            "regs": [[i, v] for i, v in self.regs],
            "redist": [[o, v] for o, v in self.redist],
            "icc": [[r, v] for r, v in self.icc],
        }

    @classmethod
    def from_wire(cls, d: object, where: str) -> Arm64VcpuState:
        m = _mapping(d, where, _VCPU_KEYS)
        mp_state = _int(m, "mp_state", where, 0, (1 << 32) - 1)
        if mp_state not in ARM64_MP_STATES:
            raise _error(where, "mp_state", f"{mp_state} is not an arm64 KVM_MP_STATE_* value")
        events = _bytes(m, "events", where)
        if len(events) != EVENTS_BYTES:
            raise _error(
                where,
                "events",
                f"{len(events)} bytes, expected {EVENTS_BYTES} (struct kvm_vcpu_events)",
            )
        regs: list[tuple[int, bytes]] = []
        seen: set[int] = set()
        for i, pair in enumerate(_list(m, "regs", where, MAX_REGS)):
            here = f"{where}.regs[{i}]"
            reg_id, value = _pair(pair, here)
            reg_id = _int_value(reg_id, here + "[0]", 0, (1 << 64) - 1)
            if reg_id & uapi.KVM_REG_ARCH_MASK != uapi.KVM_REG_ARM64:
                raise StateFormatError(f"arm64 state: {here}: {reg_id:#x} is no arm64 register id")
            size = reg_size(reg_id)
            data = _bytes_value(value, here + "[1]")
            if size > MAX_REG_BYTES or len(data) != size:
                raise StateFormatError(
                    f"arm64 state: {here}: {reg_name(reg_id)} has {len(data)} bytes, its id says {size}"
                )
            if reg_id in seen:
                raise StateFormatError(f"arm64 state: {here}: {reg_name(reg_id)} appears twice")
            seen.add(reg_id)
            regs.append((reg_id, data))
        if MPIDR_EL1 not in seen:
            raise _error(where, "regs", "MPIDR_EL1 is missing (it names the redistributor)")
        redist = _pairs(m, "redist", where, frozenset(redist_restore_order()), 32, exact=True)
        icc = _pairs(m, "icc", where, frozenset(ICC_NAMES), 64, exact=False)
        ctlr = dict(icc).get(ICC_CTLR_EL1)
        if ctlr is None or set(dict(icc)) != set(icc_restore_order(ctlr)):
            raise _error(where, "icc", "not the CPU interface registers its ICC_CTLR_EL1 implies")
        return cls(
            index=_int(m, "index", where, 0, MAX_VCPUS - 1),
            mp_state=mp_state,
            events=events,
            regs=tuple(regs),
            redist=redist,
            icc=icc,
        )


@dataclass(frozen=True)
class Arm64MachineState:
    """The whole arm64 machine: vCPUs, vGIC v3 (distributor, line levels) and ITS registers.

    The tables the vGIC keeps in guest RAM (LPI pending tables; ITS device, collection and
    interrupt translation tables) travel with the memory: `save_its_tables` writes them.
    """

    target: int  # KVM_ARM_VCPU_INIT target
    features: int  # KVM_ARM_VCPU_INIT features[0], without POWER_OFF
    nr_irqs: int
    gicd_base: int
    gicr_base: int
    its_base: int  # 0: the VM has no ITS
    vcpus: tuple[Arm64VcpuState, ...]
    dist: Pairs  # (GICD offset, u32)
    line_levels: Pairs  # (vINTID, a multiple of 32 from 32; u32 bitmap) for the SPIs
    its: Pairs  # (GITS offset, u64); () without an ITS
    timings: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_its(self) -> bool:
        return bool(self.its)

    def to_wire(self) -> dict[str, Any]:
        return {
            **_W.header(),
            "arch": "aarch64",
            "target": self.target,
            "features": self.features,
            "nr_irqs": self.nr_irqs,
            "gicd_base": self.gicd_base,
            "gicr_base": self.gicr_base,
            "its_base": self.its_base,
            "vcpus": [v.to_wire() for v in self.vcpus],
            "dist": [[o, v] for o, v in self.dist],
            "line_levels": [[i, v] for i, v in self.line_levels],
            "its": [[o, v] for o, v in self.its],
        }

    @classmethod
    def from_wire(cls, d: object) -> Arm64MachineState:
        _W.read_header(d)
        m = _mapping(d, "", _VM_KEYS)
        if m["arch"] != "aarch64":
            raise _error("", "arch", f"{m['arch']!r}: this is the arm64 state reader")
        nr_irqs = _int(m, "nr_irqs", "", MIN_NR_IRQS, MAX_NR_IRQS)
        if nr_irqs % 32:
            raise _error("", "nr_irqs", f"{nr_irqs} is not a multiple of 32")
        vcpu_list = _list(m, "vcpus", "", MAX_VCPUS)
        if not vcpu_list:
            raise _error("", "vcpus", "no vCPUs")
        vcpus = tuple(Arm64VcpuState.from_wire(v, f"vcpus[{i}]") for i, v in enumerate(vcpu_list))
        for i, v in enumerate(vcpus):
            if v.index != i:
                raise StateFormatError(f"arm64 state: vcpus[{i}].index: {v.index}, expected {i}")
        its_base = _int(m, "its_base", "", 0, (1 << 52) - 1)
        its = _pairs(m, "its", "", ITS_SAVED, 64, exact=bool(its_base))
        if bool(its) != bool(its_base):
            raise _error("", "its", "ITS registers and its_base disagree on whether there is an ITS")
        levels = _pairs(m, "line_levels", "", frozenset(range(32, nr_irqs, 32)), 32, exact=True)
        return cls(
            target=_int(m, "target", "", 0, (1 << 32) - 1),
            features=_int(m, "features", "", 0, (1 << 32) - 1),
            nr_irqs=nr_irqs,
            gicd_base=_int(m, "gicd_base", "", 0, (1 << 52) - 1),
            gicr_base=_int(m, "gicr_base", "", 0, (1 << 52) - 1),
            its_base=its_base,
            vcpus=vcpus,
            dist=_pairs(m, "dist", "", frozenset(dist_restore_order(nr_irqs)), 32, exact=True),
            line_levels=levels,
            its=its,
        )


ARM64_MP_STATES = frozenset({uapi.KVM_MP_STATE_RUNNABLE, uapi.KVM_MP_STATE_STOPPED, uapi.KVM_MP_STATE_SUSPENDED})
EVENTS_BYTES = ctypes.sizeof(uapi.kvm_vcpu_events_arm64)
_VCPU_KEYS = frozenset("index mp_state events regs redist icc".split())
_VM_KEYS = frozenset(
    "version arch target features nr_irqs gicd_base gicr_base its_base vcpus dist line_levels its".split()
)


# ---- wire validation helpers ----------------------------------------------------------------


def _pair(value: object, path: str) -> tuple[object, object]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise StateFormatError(f"arm64 state: {path}: expected a [key, value] pair")
    return value[0], value[1]


def _pairs(m: Mapping[str, Any], key: str, where: str, allowed: frozenset[int], bits: int, exact: bool) -> Pairs:
    """(register, value) pairs: registers from `allowed`, each once (all of them if `exact`)."""
    path = f"{where}.{key}" if where else key
    pairs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for i, pair in enumerate(_list(m, key, where, len(allowed))):
        here = f"{path}[{i}]"
        reg, value = _pair(pair, here)
        reg = _int_value(reg, here + "[0]", 0, (1 << 64) - 1)
        if reg not in allowed:
            raise StateFormatError(f"arm64 state: {here}: {reg:#x} is not a register saved here")
        if reg in seen:
            raise StateFormatError(f"arm64 state: {here}: {reg:#x} appears twice")
        seen.add(reg)
        pairs.append((reg, _int_value(value, here + "[1]", 0, (1 << bits) - 1)))
    if exact and seen != allowed:
        missing = sorted(allowed - seen)
        raise StateFormatError(f"arm64 state: {path}: {len(missing)} register(s) missing, the first {missing[0]:#x}")
    return tuple(pairs)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def save_vcpu_registers(vcpu: Vcpu) -> tuple[tuple[int, bytes], ...]:
    """Every register KVM_GET_REG_LIST names (core, FP/SIMD, system, timer, firmware)."""
    return tuple((reg_id, get_one_reg(vcpu, reg_id)) for reg_id in reg_list(vcpu))


def _get_mp_state(vcpu: Vcpu) -> int:
    mp = uapi.kvm_mp_state()
    vcpu.ioctl("KVM_GET_MP_STATE", uapi.KVM_GET_MP_STATE, mp)
    return int(mp.mp_state)


def _redist_name(offset: int) -> str:
    return f"GICR+{offset:#x}"


def save_vcpu_state(vm: Vm, vcpu: Vcpu) -> Arm64VcpuState:
    """One vCPU: registers, MP_STATE, VCPU_EVENTS, its redistributor and CPU interface."""
    _require_parked([vcpu], "saving")
    vgic = _vgic(vm)
    regs = save_vcpu_registers(vcpu)
    if MPIDR_EL1 not in dict(regs):
        raise StateError(f"vCPU {vcpu.index}: KVM_GET_REG_LIST does not list MPIDR_EL1")
    mpidr_el1 = int.from_bytes(dict(regs)[MPIDR_EL1], "little")
    events = uapi.kvm_vcpu_events_arm64()
    vcpu.ioctl("KVM_GET_VCPU_EVENTS", uapi.KVM_GET_VCPU_EVENTS, events)
    redist = tuple(
        (
            offset,
            vgic.get(
                f"GRP_REDIST_REGS vCPU {vcpu.index} {_redist_name(offset)}",
                uapi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                _cpu_attr(mpidr_el1, offset),
                bits=32,
            ),
        )
        for offset in redist_restore_order()
    )

    def icc(reg: int) -> int:
        return vgic.get(
            f"GRP_CPU_SYSREGS vCPU {vcpu.index} {ICC_NAMES[reg]}",
            uapi.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            _cpu_attr(mpidr_el1, reg),
        )

    ctlr = icc(ICC_CTLR_EL1)
    icc_regs = tuple((reg, ctlr if reg == ICC_CTLR_EL1 else icc(reg)) for reg in icc_restore_order(ctlr))
    return Arm64VcpuState(
        index=vcpu.index,
        mp_state=_get_mp_state(vcpu),
        events=bytes(events),
        regs=regs,
        redist=redist,
        icc=icc_regs,
    )


def save_vm_state(vm: Vm) -> Arm64MachineState:
    """The whole machine, registers only; every vCPU parked (`vm.pause()`) or not started.

    This writes no guest RAM. The tables the vGIC keeps in guest RAM are written by
    `save_its_tables`, which the migration calls at R6.3 (before KVM_GET_DIRTY_LOG).
    """
    times = StepTimes()
    start = time.perf_counter()
    _require_parked(vm.vcpus, "saving")
    arm = machine(vm)
    if not vm.vcpus:
        raise StateError("the VM has no vCPUs to save")
    vgic = _vgic(vm)
    vcpus = []
    for vcpu in vm.vcpus:
        with times.step("vcpus"):
            vcpus.append(save_vcpu_state(vm, vcpu))
    with times.step("distributor"):
        dist = tuple(
            (
                offset,
                vgic.get(
                    f"GRP_DIST_REGS GICD+{offset:#x}",
                    uapi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
                    offset,
                    bits=32,
                ),
            )
            for offset in dist_restore_order(arm.nr_irqs)
        )
        levels = tuple(
            (
                intid,
                vgic.get(
                    f"GRP_LEVEL_INFO {intid}",
                    uapi.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                    _level_attr(vcpus[0].mpidr, intid),
                    bits=32,
                ),
            )
            for intid in range(32, arm.nr_irqs, 32)
        )
    its: Pairs = ()
    its_base = 0
    if arm.its is not None:
        with times.step("its"):
            base = its_address(vm)
            if base is None:
                raise StateError("the ITS has no base address: nothing a guest could have used")
            its_base = base
            its = tuple(
                (
                    reg,
                    arm.its.get(f"GRP_ITS_REGS {ITS_NAMES[reg]}", uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS, reg),
                )
                for reg in (*ITS_REGS_BEFORE_TABLES, GITS_CTLR)
            )
    times.seconds["total"] = time.perf_counter() - start
    return Arm64MachineState(
        target=arm.target,
        features=arm.features,
        nr_irqs=arm.nr_irqs,
        gicd_base=GICD_BASE,
        gicr_base=GICR_BASE,
        its_base=its_base,
        vcpus=tuple(vcpus),
        dist=dist,
        line_levels=levels,
        its=its,
        timings=dict(times.seconds),
    )


def _level_attr(mpidr_el1: int, intid: int) -> int:
    # arm-vgic-v3.rst KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO: "| mpidr | info | vINTID |" with
    # VGIC_LEVEL_INFO_LINE_LEVEL: "Get/Set the input level of the IRQ line for a set of 32
    # contiguously numbered interrupts. vINTID must be a multiple of 32." SPIs are "reported
    # with the same value regardless of the mpidr specified" (one that names a vCPU).
    info = uapi.VGIC_LEVEL_INFO_LINE_LEVEL << uapi.KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT
    return _cpu_attr(mpidr_el1, info | intid)


# --------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------
def check_compatible(vm: Vm, state: Arm64MachineState) -> None:
    """Refuse, with the reason, a state that cannot be restored into `vm`."""
    arm = machine(vm)
    if len(vm.vcpus) != len(state.vcpus):
        raise IncompatibleStateError(f"the state has {len(state.vcpus)} vCPU(s); the target VM has {len(vm.vcpus)}")
    if (arm.target, arm.features) != (state.target, state.features):
        raise IncompatibleStateError(
            f"the VM's vCPUs were initialized as target {state.target} with features "
            f"{state.features:#x}; this host's KVM gives target {arm.target}, features "
            f"{arm.features:#x}: another CPU type"
        )
    if arm.nr_irqs != state.nr_irqs:
        raise IncompatibleStateError(
            f"the VM's vGIC has {state.nr_irqs} interrupts, the target's {arm.nr_irqs} (fixed at its CTRL_INIT)"
        )
    if (state.gicd_base, state.gicr_base) != (GICD_BASE, GICR_BASE):
        raise IncompatibleStateError(
            f"the VM's GIC sits at {state.gicd_base:#x}/{state.gicr_base:#x}, this "
            f"migrated's at {GICD_BASE:#x}/{GICR_BASE:#x}"
        )
    if state.has_its != (arm.its is not None):
        raise IncompatibleStateError(
            "the source VM "
            + ("had" if state.has_its else "had no")
            + " ITS; the target "
            + ("has" if arm.its is not None else "has none")
        )
    for vcpu, saved in zip(vm.vcpus, state.vcpus):
        known = set(reg_list(vcpu))
        unknown = [reg_id for reg_id, _ in saved.regs if reg_id not in known]
        if unknown:
            raise IncompatibleStateError(
                f"vCPU {vcpu.index}: {len(unknown)} register(s) of the VM are unknown to this "
                "host's KVM: " + ", ".join(reg_name(r) for r in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            )


# --------------------------------------------------------------------------------------------
# Restore (DESIGN R9; arm-vgic-its.rst "ITS Restore Sequence")
# --------------------------------------------------------------------------------------------
def restore_vcpu_registers(vcpu: Vcpu, state: Arm64VcpuState) -> None:
    """ONE_REG values in KVM_GET_REG_LIST order, then MP_STATE and VCPU_EVENTS."""
    for reg_id, value in state.regs:
        set_one_reg(vcpu, reg_id, value)
    # api.rst 4.39 KVM_SET_MP_STATE, arm64: "The only states that are valid are
    # KVM_MP_STATE_STOPPED and KVM_MP_STATE_RUNNABLE which reflect if the vcpu should be paused
    # or not." (A powered-off secondary is STOPPED; PSCI CPU_ON makes it RUNNABLE.)
    mp = uapi.kvm_mp_state(mp_state=state.mp_state)
    vcpu.ioctl("KVM_SET_MP_STATE", uapi.KVM_SET_MP_STATE, mp)
    events = uapi.kvm_vcpu_events_arm64.from_buffer_copy(state.events)
    vcpu.ioctl("KVM_SET_VCPU_EVENTS", uapi.KVM_SET_VCPU_EVENTS, events)


def _restore_dist(vgic: Device, state: Arm64MachineState) -> None:
    values = dict(state.dist)
    grp = uapi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS
    levels_after = _spi_words(GICD_ICFGR, state.nr_irqs, 2)[-1]
    for offset in dist_restore_order(state.nr_irqs):
        value = values[offset]
        clear = _dist_clear_twin(offset)
        if clear is not None:
            vgic.set(f"GRP_DIST_REGS GICD+{clear:#x}", grp, clear, ~value & 0xFFFF_FFFF, bits=32)
        vgic.set(f"GRP_DIST_REGS GICD+{offset:#x}", grp, offset, value, bits=32)
        if offset == levels_after:
            # The SPIs' input levels, once their trigger configuration (ICFGR) is in place and
            # before pending state: for a level-triggered SPI, pending is latch OR level.
            for intid, level in state.line_levels:
                vgic.set(
                    f"GRP_LEVEL_INFO {intid}",
                    uapi.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                    _level_attr(state.vcpus[0].mpidr, intid),
                    level,
                    bits=32,
                )


def _restore_redist(vgic: Device, state: Arm64VcpuState) -> None:
    values = dict(state.redist)
    grp = uapi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS
    for offset in redist_restore_order():
        value = values[offset]
        clear = _CLEAR_TWIN.get(offset)
        where = f"GRP_REDIST_REGS vCPU {state.index}"
        if clear is not None:
            vgic.set(
                f"{where} {_redist_name(clear)}",
                grp,
                _cpu_attr(state.mpidr, clear),
                ~value & 0xFFFF_FFFF,
                bits=32,
            )
        vgic.set(f"{where} {_redist_name(offset)}", grp, _cpu_attr(state.mpidr, offset), value, bits=32)


def _restore_icc(vgic: Device, state: Arm64VcpuState) -> None:
    values = dict(state.icc)
    for reg in icc_restore_order(values[ICC_CTLR_EL1]):
        vgic.set(
            f"GRP_CPU_SYSREGS vCPU {state.index} {ICC_NAMES[reg]}",
            uapi.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            _cpu_attr(state.mpidr, reg),
            values[reg],
        )


def restore_vm_state(vm: Vm, state: Arm64MachineState, *, check: bool = True) -> RestoreReport:
    """Write the whole machine's state into `vm`, built like the source and never run.

    Guest RAM must be in place first (R9): enabling LPIs reads the pending tables and
    ITS_RESTORE_TABLES reads the ITS tables from it. The vGIC is initialized already
    (`create_vgic` ran CTRL_INIT, which register access needs: KVM answers EBUSY before it).

    The order, after arm-vgic-its.rst's "ITS Restore Sequence" ("a) restore all guest memory
    and create vcpus b) restore all redistributors c) provide the ITS base address
    (KVM_DEV_ARM_VGIC_GRP_ADDR) d) restore the ITS in the following order: 1. Restore
    GITS_CBASER 2. Restore all other GITS_ registers, except GITS_CTLR! 3. Load the ITS table
    data (KVM_DEV_ARM_ITS_RESTORE_TABLES) 4. Restore GITS_CTLR. Then vcpus can be started.")
    and its requirement "The GICV3 must be restored before the ITS":

      1. every vCPU: ONE_REG registers (MPIDR_EL1 among them, which the redistributors are
         addressed by), MP_STATE, VCPU_EVENTS;
      2. the distributor, GICD_IIDR first ("Userspace should set GICD_IIDR before setting any
         other registers"), GICD_CTLR last; the SPIs' line levels after their configuration;
      3. every redistributor (PROPBASER, PENDBASER, SGI/PPI state, GICR_CTLR last);
      4. every CPU interface (ICC_*_EL1);
      5. the ITS base address: set here if the target's ITS was created without one
         (`create_its(vm, address=None)`), else checked to be the saved one. What step c)
         guarantees is that the address precedes the ITS registers (KVM answers ENXIO to
         GRP_ITS_REGS until it is set); `Vm.create` sets it at creation, earlier still;
      6. GITS_CBASER, GITS_IIDR, GITS_CREADR, GITS_CWRITER, GITS_BASER0..7;
      7. KVM_DEV_ARM_ITS_RESTORE_TABLES;
      8. GITS_CTLR.
    """
    times = StepTimes()
    start = time.perf_counter()
    _require_parked(vm.vcpus, "restoring")
    machine(vm)
    if check:
        with times.step("check"):
            check_compatible(vm, state)
    vgic = _vgic(vm)
    with times.step("vcpus"):
        for vcpu, vcpu_state in zip(vm.vcpus, state.vcpus):
            restore_vcpu_registers(vcpu, vcpu_state)
    with times.step("distributor"):
        _restore_dist(vgic, state)
    with times.step("redistributors"):
        for vcpu_state in state.vcpus:
            _restore_redist(vgic, vcpu_state)
    with times.step("cpu_interfaces"):
        for vcpu_state in state.vcpus:
            _restore_icc(vgic, vcpu_state)
    if state.has_its:
        its = _its(vm)
        with times.step("its"):
            here = its_address(vm)
            if here is None:
                set_its_address(vm, state.its_base)
            elif here != state.its_base:
                raise IncompatibleStateError(
                    f"the ITS sits at {state.its_base:#x} in the state, at {here:#x} in the target"
                )
            values = dict(state.its)
            grp = uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS
            for reg in ITS_REGS_BEFORE_TABLES:
                its.set(f"GRP_ITS_REGS {ITS_NAMES[reg]}", grp, reg, values[reg])
            # "KVM_DEV_ARM_ITS_RESTORE_TABLES restore the ITS tables from guest RAM to ITS
            # internal structures. The GICV3 must be restored before the ITS and all ITS
            # registers but the GITS_CTLR must be restored before restoring the ITS tables."
            its.ctrl("ITS_RESTORE_TABLES", uapi.KVM_DEV_ARM_ITS_RESTORE_TABLES)
            its.set("GRP_ITS_REGS GITS_CTLR", grp, GITS_CTLR, values[GITS_CTLR])
    times.seconds["total"] = time.perf_counter() - start
    return RestoreReport(timings=dict(times.seconds))
