"""The arm64 KVM userspace API: what only the aarch64 <asm/kvm.h> (or asm/ptrace.h) defines, and
the generic names the arm64 code path uses. The common numbers are in `migrated/kvm/uapi.py`.

`tests/kvm/test_uapi_headers.py` compiles ARM64_ONLY, ARM64_STRUCTS and ARM64_SHARED against the
aarch64 headers of `.ci/fetch-headers`, and the rest against the x86_64 ones.
"""

from __future__ import annotations

import ctypes

from ...uapi import (
    KVM_REG_ARM64,
    KVM_REG_SIZE_U64,
    _iow,
    _ior,
    u8,
    u32,
    u64,
)

_IMPORTED = frozenset(globals())


class kvm_vcpu_init(ctypes.Structure):  # arm64 asm/kvm.h
    _fields_ = [("target", u32), ("features", u32 * 7)]


class user_pt_regs(ctypes.Structure):  # arm64 asm/ptrace.h
    _fields_ = [("regs", u64 * 31), ("sp", u64), ("pc", u64), ("pstate", u64)]


class user_fpsimd_state(ctypes.Structure):  # arm64 asm/ptrace.h
    # __uint128_t vregs[32] carried as pairs of u64 (little-endian: low half first).
    _fields_ = [
        ("vregs", (u64 * 2) * 32),
        ("fpsr", u32),
        ("fpcr", u32),
        ("__reserved", u32 * 2),
    ]


KVM_NR_SPSR = 5


class kvm_regs_arm64(ctypes.Structure):
    """arm64's `struct kvm_regs` (x86's is `kvm_regs` above). Only its layout is used: core
    register ids for KVM_GET/SET_ONE_REG are offsets into it in units of u32."""

    _fields_ = [
        ("regs", user_pt_regs),
        ("sp_el1", u64),
        ("elr_el1", u64),
        ("spsr", u64 * KVM_NR_SPSR),
        ("pad_fp_regs", u64),  # fp_regs is __attribute__((aligned(16))) in C
        ("fp_regs", user_fpsimd_state),
    ]


class kvm_vcpu_events_arm64_exception(ctypes.Structure):
    _fields_ = [
        ("serror_pending", u8),
        ("serror_has_esr", u8),
        ("ext_dabt_pending", u8),
        ("pad", u8 * 5),
        ("serror_esr", u64),
    ]


class kvm_vcpu_events_arm64(ctypes.Structure):
    """arm64's `struct kvm_vcpu_events` (64 bytes, like x86's, so the ioctl numbers agree)."""

    _fields_ = [("exception", kvm_vcpu_events_arm64_exception), ("reserved", u32 * 12)]


KVM_ARM_VCPU_INIT = _iow(0xAE, kvm_vcpu_init)


KVM_ARM_PREFERRED_TARGET = _ior(0xAF, kvm_vcpu_init)


# ONE_REG id encoding (arm64 asm/kvm.h)
KVM_REG_ARM_COPROC_MASK = 0x000000000FFF0000


KVM_REG_ARM_COPROC_SHIFT = 16


KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT


KVM_REG_ARM_DEMUX = 0x0011 << KVM_REG_ARM_COPROC_SHIFT


KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT


KVM_REG_ARM64_SYSREG_OP0_MASK = 0x000000000000C000


KVM_REG_ARM64_SYSREG_OP0_SHIFT = 14


KVM_REG_ARM64_SYSREG_OP1_MASK = 0x0000000000003800


KVM_REG_ARM64_SYSREG_OP1_SHIFT = 11


KVM_REG_ARM64_SYSREG_CRN_MASK = 0x0000000000000780


KVM_REG_ARM64_SYSREG_CRN_SHIFT = 7


KVM_REG_ARM64_SYSREG_CRM_MASK = 0x0000000000000078


KVM_REG_ARM64_SYSREG_CRM_SHIFT = 3


KVM_REG_ARM64_SYSREG_OP2_MASK = 0x0000000000000007


KVM_REG_ARM64_SYSREG_OP2_SHIFT = 0


KVM_REG_ARM_FW = 0x0014 << KVM_REG_ARM_COPROC_SHIFT


KVM_REG_ARM64_SVE = 0x0015 << KVM_REG_ARM_COPROC_SHIFT


KVM_REG_ARM_FW_FEAT_BMAP = 0x0016 << KVM_REG_ARM_COPROC_SHIFT


def arm64_sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """ARM64_SYS_REG(op0, op1, crn, crm, op2) of asm/kvm.h: a 64-bit system register's id."""
    return (
        KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG
        | (op0 << KVM_REG_ARM64_SYSREG_OP0_SHIFT) & KVM_REG_ARM64_SYSREG_OP0_MASK
        | (op1 << KVM_REG_ARM64_SYSREG_OP1_SHIFT) & KVM_REG_ARM64_SYSREG_OP1_MASK
        | (crn << KVM_REG_ARM64_SYSREG_CRN_SHIFT) & KVM_REG_ARM64_SYSREG_CRN_MASK
        | (crm << KVM_REG_ARM64_SYSREG_CRM_SHIFT) & KVM_REG_ARM64_SYSREG_CRM_MASK
        | (op2 << KVM_REG_ARM64_SYSREG_OP2_SHIFT) & KVM_REG_ARM64_SYSREG_OP2_MASK
    )


# Timer registers. api.rst: "KVM_REG_ARM_TIMER_CVAL and KVM_REG_ARM_TIMER_CNT ... had their values
# accidentally swapped ... As this is API, it must remain this way."
KVM_REG_ARM_TIMER_CTL = arm64_sys_reg(3, 3, 14, 3, 1)


KVM_REG_ARM_TIMER_CVAL = arm64_sys_reg(3, 3, 14, 0, 2)


KVM_REG_ARM_TIMER_CNT = arm64_sys_reg(3, 3, 14, 3, 2)


KVM_REG_ARM_PTIMER_CTL = arm64_sys_reg(3, 3, 14, 2, 1)


KVM_REG_ARM_PTIMER_CVAL = arm64_sys_reg(3, 3, 14, 2, 2)


KVM_REG_ARM_PTIMER_CNT = arm64_sys_reg(3, 3, 14, 0, 1)


KVM_REG_ARM_PSCI_VERSION = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | 0


# KVM_ARM_VCPU_INIT features (bit numbers in features[0])
KVM_ARM_VCPU_POWER_OFF = 0


KVM_ARM_VCPU_EL1_32BIT = 1


KVM_ARM_VCPU_PSCI_0_2 = 2


KVM_ARM_VCPU_PMU_V3 = 3


# vGIC v3 / ITS (Documentation/virt/kvm/devices/arm-vgic-v3.rst, arm-vgic-its.rst)
KVM_VGIC_V3_ADDR_TYPE_DIST = 2


KVM_VGIC_V3_ADDR_TYPE_REDIST = 3


KVM_VGIC_ITS_ADDR_TYPE = 4


KVM_DEV_ARM_VGIC_GRP_ADDR = 0


KVM_DEV_ARM_VGIC_GRP_DIST_REGS = 1


KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3


KVM_DEV_ARM_VGIC_GRP_CTRL = 4


KVM_DEV_ARM_VGIC_GRP_REDIST_REGS = 5


KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS = 6


KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO = 7


KVM_DEV_ARM_VGIC_GRP_ITS_REGS = 8


KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT = 32


KVM_DEV_ARM_VGIC_V3_MPIDR_MASK = 0xFFFFFFFF << KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT


KVM_DEV_ARM_VGIC_OFFSET_SHIFT = 0


KVM_DEV_ARM_VGIC_OFFSET_MASK = 0xFFFFFFFF << KVM_DEV_ARM_VGIC_OFFSET_SHIFT


KVM_DEV_ARM_VGIC_SYSREG_INSTR_MASK = 0xFFFF


KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT = 10


KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_MASK = 0x3FFFFF << KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT


KVM_DEV_ARM_VGIC_LINE_LEVEL_INTID_MASK = 0x3FF


VGIC_LEVEL_INFO_LINE_LEVEL = 0  # not KVM_-prefixed in the header either


KVM_DEV_ARM_VGIC_CTRL_INIT = 0


KVM_DEV_ARM_ITS_SAVE_TABLES = 1


KVM_DEV_ARM_ITS_RESTORE_TABLES = 2


KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES = 3


KVM_DEV_ARM_ITS_CTRL_RESET = 4


# KVM_IRQ_LINE's irq field on arm64 (api.rst 4.25)
KVM_ARM_IRQ_VCPU2_SHIFT = 28


KVM_ARM_IRQ_VCPU2_MASK = 0xF


KVM_ARM_IRQ_TYPE_SHIFT = 24


KVM_ARM_IRQ_TYPE_MASK = 0xF


KVM_ARM_IRQ_VCPU_SHIFT = 16


KVM_ARM_IRQ_VCPU_MASK = 0xFF


KVM_ARM_IRQ_NUM_SHIFT = 0


KVM_ARM_IRQ_NUM_MASK = 0xFFFF


KVM_ARM_IRQ_TYPE_CPU = 0


KVM_ARM_IRQ_TYPE_SPI = 1


KVM_ARM_IRQ_TYPE_PPI = 2


# Every arm64-only name of this section: the explicit ones and those with an arm64 prefix.
ARM64_ONLY = frozenset(
    {
        "KVM_NR_SPSR",
        "KVM_ARM_VCPU_INIT",
        "KVM_ARM_PREFERRED_TARGET",
        *(
            name
            for name in list(globals())
            if name not in _IMPORTED
            and name.startswith(
                (
                    "KVM_REG_ARM_",
                    "KVM_REG_ARM64_",
                    "KVM_ARM_VCPU_",
                    "KVM_VGIC_",
                    "KVM_DEV_ARM_",
                    "KVM_ARM_IRQ_",
                )
            )
        ),
    }
)


# arm64 layouts, by C struct name, checked against the aarch64 headers only.
ARM64_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "kvm_vcpu_init": kvm_vcpu_init,
    "user_pt_regs": user_pt_regs,
    "user_fpsimd_state": user_fpsimd_state,
    "kvm_regs": kvm_regs_arm64,
    "kvm_vcpu_events": kvm_vcpu_events_arm64,
}


ARM64_UNCHECKED_FIELDS: dict[str, frozenset[str]] = {"kvm_regs": frozenset({"pad_fp_regs"})}


# Generic names (constants and structs) that the arm64 code path uses: also checked against the
# aarch64 headers, where asm/kvm.h could in principle change a layout or a number.
ARM64_SHARED = frozenset(
    {
        "KVM_GET_API_VERSION",
        "KVM_CREATE_VM",
        "KVM_CHECK_EXTENSION",
        "KVM_GET_VCPU_MMAP_SIZE",
        "KVM_CREATE_VCPU",
        "KVM_GET_DIRTY_LOG",
        "KVM_CLEAR_DIRTY_LOG",
        "KVM_SET_USER_MEMORY_REGION",
        "KVM_ENABLE_CAP",
        "KVM_RESET_DIRTY_RINGS",
        "KVM_RUN",
        "KVM_GET_MP_STATE",
        "KVM_SET_MP_STATE",
        "KVM_GET_VCPU_EVENTS",
        "KVM_SET_VCPU_EVENTS",
        "KVM_IRQ_LINE",
        "KVM_GET_ONE_REG",
        "KVM_SET_ONE_REG",
        "KVM_GET_REG_LIST",
        "KVM_CREATE_DEVICE",
        "KVM_SET_DEVICE_ATTR",
        "KVM_GET_DEVICE_ATTR",
        "KVM_HAS_DEVICE_ATTR",
        "KVM_CAP_USER_MEMORY",
        "KVM_CAP_NR_VCPUS",
        "KVM_CAP_NR_MEMSLOTS",
        "KVM_CAP_MAX_VCPUS",
        "KVM_CAP_MAX_VCPU_ID",
        "KVM_CAP_IMMEDIATE_EXIT",
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        "KVM_CAP_DIRTY_LOG_RING",
        "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
        "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
        "KVM_CAP_ONE_REG",
        "KVM_CAP_ARM_PSCI",
        "KVM_CAP_DEVICE_CTRL",
        "KVM_CAP_ARM_PSCI_0_2",
        "KVM_CAP_ARM_VM_IPA_SIZE",
        "KVM_CAP_ARM_IRQ_LINE_LAYOUT_2",
        "KVM_DEV_TYPE_ARM_VGIC_V3",
        "KVM_DEV_TYPE_ARM_VGIC_ITS",
        "KVM_CREATE_DEVICE_TEST",
        "KVM_MEM_LOG_DIRTY_PAGES",
        "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
        "KVM_DIRTY_GFN_F_DIRTY",
        "KVM_DIRTY_GFN_F_RESET",
        "KVM_DIRTY_LOG_PAGE_OFFSET",
        "KVM_EXIT_UNKNOWN",
        "KVM_EXIT_MMIO",
        "KVM_EXIT_INTR",
        "KVM_EXIT_SYSTEM_EVENT",
        "KVM_EXIT_INTERNAL_ERROR",
        "KVM_EXIT_FAIL_ENTRY",
        "KVM_EXIT_DIRTY_RING_FULL",
        "KVM_MP_STATE_RUNNABLE",
        "KVM_MP_STATE_STOPPED",
        "KVM_MP_STATE_SUSPENDED",
        "KVM_REG_ARCH_MASK",
        "KVM_REG_ARM64",
        "KVM_REG_SIZE_SHIFT",
        "KVM_REG_SIZE_MASK",
        "KVM_REG_SIZE_U8",
        "KVM_REG_SIZE_U16",
        "KVM_REG_SIZE_U32",
        "KVM_REG_SIZE_U64",
        "KVM_REG_SIZE_U128",
        "KVM_REG_SIZE_U256",
        "KVM_REG_SIZE_U512",
        "KVM_REG_SIZE_U1024",
        "KVM_REG_SIZE_U2048",
        # structs
        "kvm_userspace_memory_region",
        "kvm_enable_cap",
        "kvm_dirty_log",
        "kvm_clear_dirty_log",
        "kvm_dirty_gfn",
        "kvm_mp_state",
        "kvm_run",
        "kvm_one_reg",
        "kvm_reg_list",
        "kvm_create_device",
        "kvm_device_attr",
        "kvm_irq_level",
    }
)


def constants() -> dict[str, int]:
    """Every arm64-only constant, by its C name (the header check adds them to the common ones)."""
    return {name: globals()[name] for name in sorted(ARM64_ONLY)}
