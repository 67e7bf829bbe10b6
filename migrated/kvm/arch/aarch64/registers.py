"""arm64 vCPU registers through ONE_REG (api.rst 4.68, 4.69) and KVM_GET_REG_LIST (4.84): ids,
names for messages, reads and writes, and the MPIDR that names a vCPU to the vGIC."""

from __future__ import annotations

import ctypes
import errno

from ... import uapi
from . import uapi as arm_uapi
from ..._libc import ioctl
from ...errors import KvmIoctlError
from ...saved_state import (
    StateError,
)
from ...vcpu import Vcpu

# Bounds on what a peer may send (DESIGN section 6).
MAX_REGS = 4096  # KVM_GET_REG_LIST gives a few hundred


MAX_REG_BYTES = 256  # KVM_REG_SIZE_U2048, the largest ONE_REG size


def reg_size(reg_id: int) -> int:
    """KVM_REG_SIZE(id): the bytes a register's value takes."""
    return 1 << ((reg_id & uapi.KVM_REG_SIZE_MASK) >> uapi.KVM_REG_SIZE_SHIFT)


def _core_id(offset: int, size: int) -> int:
    # asm/kvm.h: KVM_REG_ARM_CORE_REG(name) is offsetof(struct kvm_regs, name) / sizeof(__u32);
    # api.rst: "The index is a 32bit value in the kvm_regs structure seen as a 32bit array".
    return uapi.KVM_REG_ARM64 | size | arm_uapi.KVM_REG_ARM_CORE | offset // 4


def _core_registers() -> tuple[dict[str, int], dict[str, str]]:
    regs = arm_uapi.kvm_regs_arm64
    pt = regs.regs.offset
    ids: dict[str, int] = {}
    members: dict[str, str] = {}
    for n in range(31):
        ids[f"X{n}"] = _core_id(pt + arm_uapi.user_pt_regs.regs.offset + 8 * n, uapi.KVM_REG_SIZE_U64)
        members[f"X{n}"] = f"regs.regs[{n}]"
    for name, member in (("SP", "sp"), ("PC", "pc"), ("PSTATE", "pstate")):
        ids[name] = _core_id(pt + getattr(arm_uapi.user_pt_regs, member).offset, uapi.KVM_REG_SIZE_U64)
        members[name] = f"regs.{member}"
    for name, member in (("SP_EL1", "sp_el1"), ("ELR_EL1", "elr_el1")):
        ids[name] = _core_id(getattr(regs, member).offset, uapi.KVM_REG_SIZE_U64)
        members[name] = member
    for n, name in enumerate(("SPSR_EL1", "SPSR_ABT", "SPSR_UND", "SPSR_IRQ", "SPSR_FIQ")):
        ids[name] = _core_id(regs.spsr.offset + 8 * n, uapi.KVM_REG_SIZE_U64)
        members[name] = f"spsr[{n}]"
    fp = regs.fp_regs.offset
    for n in range(32):
        offset = fp + arm_uapi.user_fpsimd_state.vregs.offset + 16 * n
        ids[f"V{n}"] = _core_id(offset, uapi.KVM_REG_SIZE_U128)
        members[f"V{n}"] = f"fp_regs.vregs[{n}]"
    for name, member in (("FPSR", "fpsr"), ("FPCR", "fpcr")):
        offset = fp + getattr(arm_uapi.user_fpsimd_state, member).offset
        ids[name] = _core_id(offset, uapi.KVM_REG_SIZE_U32)
        members[name] = f"fp_regs.{member}"
    return ids, members


# Core register ids by name (X0-X30, SP, PC, PSTATE, SP_EL1, ELR_EL1, SPSR_*, V0-V31, FPSR,
# FPCR), and the `struct kvm_regs` member each one stands for (checked against asm/kvm.h).
CORE_REGS, CORE_REG_MEMBERS = _core_registers()


_CORE_NAMES = {reg_id: name for name, reg_id in CORE_REGS.items()}


MPIDR_EL1 = arm_uapi.arm64_sys_reg(3, 0, 0, 0, 5)


SCTLR_EL1 = arm_uapi.arm64_sys_reg(3, 0, 1, 0, 0)


_SYSREG_NAMES = {
    MPIDR_EL1: "MPIDR_EL1",
    SCTLR_EL1: "SCTLR_EL1",
    arm_uapi.KVM_REG_ARM_TIMER_CTL: "TIMER_CTL",
    arm_uapi.KVM_REG_ARM_TIMER_CVAL: "TIMER_CVAL",
    arm_uapi.KVM_REG_ARM_TIMER_CNT: "TIMER_CNT",
    arm_uapi.KVM_REG_ARM_PTIMER_CTL: "PTIMER_CTL",
    arm_uapi.KVM_REG_ARM_PTIMER_CVAL: "PTIMER_CVAL",
    arm_uapi.KVM_REG_ARM_PTIMER_CNT: "PTIMER_CNT",
    arm_uapi.KVM_REG_ARM_PSCI_VERSION: "PSCI_VERSION",
}


# Counters: they move between a save and the next read; a round trip compares all but these.
COUNTER_REGS = frozenset({arm_uapi.KVM_REG_ARM_TIMER_CNT, arm_uapi.KVM_REG_ARM_PTIMER_CNT})


def reg_name(reg_id: int) -> str:
    """A readable name for a ONE_REG id, for messages."""
    if reg_id in _CORE_NAMES:
        return _CORE_NAMES[reg_id]
    if reg_id in _SYSREG_NAMES:
        return _SYSREG_NAMES[reg_id]
    group = reg_id & arm_uapi.KVM_REG_ARM_COPROC_MASK
    if group == arm_uapi.KVM_REG_ARM64_SYSREG:
        fields = [
            (reg_id & mask) >> shift
            for mask, shift in (
                (arm_uapi.KVM_REG_ARM64_SYSREG_OP0_MASK, arm_uapi.KVM_REG_ARM64_SYSREG_OP0_SHIFT),
                (arm_uapi.KVM_REG_ARM64_SYSREG_OP1_MASK, arm_uapi.KVM_REG_ARM64_SYSREG_OP1_SHIFT),
                (arm_uapi.KVM_REG_ARM64_SYSREG_CRN_MASK, arm_uapi.KVM_REG_ARM64_SYSREG_CRN_SHIFT),
                (arm_uapi.KVM_REG_ARM64_SYSREG_CRM_MASK, arm_uapi.KVM_REG_ARM64_SYSREG_CRM_SHIFT),
                (arm_uapi.KVM_REG_ARM64_SYSREG_OP2_MASK, arm_uapi.KVM_REG_ARM64_SYSREG_OP2_SHIFT),
            )
        ]
        return "S{}_{}_C{}_C{}_{}".format(*fields)
    if group == arm_uapi.KVM_REG_ARM_FW:
        return f"FW{reg_id & 0xFFFF}"
    if group == arm_uapi.KVM_REG_ARM_FW_FEAT_BMAP:
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


def cpu_attr(mpidr_el1: int, low: int) -> int:
    return vgic_mpidr(mpidr_el1) << arm_uapi.KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT | low
