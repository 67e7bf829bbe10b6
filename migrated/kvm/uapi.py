"""The KVM userspace API as this project uses it: numbers, capability ids and struct layouts.

Defined here once, and nowhere else (the dirty ring's flags come from `ringreader`, the lowest
layer, which its C header mirrors). What only x86 uses is in `migrated/kvm/arch/x86_64/uapi.py`,
what only arm64 uses in `migrated/kvm/arch/aarch64/uapi.py`. `tests/kvm/test_uapi_headers.py`
compiles a C program against `<linux/kvm.h>` (Debian's and a newer one) and checks every constant,
struct size and field offset below, so a wrong number cannot hide. Constants newer than Debian
12's 6.1 headers are listed in `NEWER_THAN_HOST_HEADERS` and checked against the newer headers
only.
"""

from __future__ import annotations

import ctypes

import ringreader

# --------------------------------------------------------------------------------------------
# ioctl encoding (asm-generic/ioctl.h; x86 and arm64 both use the generic layout)
# --------------------------------------------------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type[ctypes._CData] | int) -> int:
    return _ioc(_IOC_READ, nr, _size(struct))


def _iow(nr: int, struct: type[ctypes._CData] | int) -> int:
    return _ioc(_IOC_WRITE, nr, _size(struct))


def _iowr(nr: int, struct: type[ctypes._CData] | int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, _size(struct))


def _size(struct: type[ctypes._CData] | int) -> int:
    return struct if isinstance(struct, int) else ctypes.sizeof(struct)


KVMIO = 0xAE
KVM_API_VERSION = 12

# --------------------------------------------------------------------------------------------
# Structs (linux/kvm.h). x86's registers, segments and CPUID/MSR-list headers, and the ioctls
# that carry them (KVM_GET/SET_REGS, _SREGS, KVM_SET_CPUID2, KVM_GET_SUPPORTED_CPUID,
# KVM_GET_MSR_INDEX_LIST, KVM_GET_TSC_KHZ), are here too, not in arch/x86_64/uapi.py: `Vcpu` and
# `Kvm` issue them (get_regs, set_cpuid, supported_cpuid, msr_index_list, tsc_khz) and the
# arch-neutral guest layout (migrated/guests/workload.py) hands kvm_regs/kvm_sregs out; `Vcpu`
# and `Kvm` sit below the arch seam and cannot import from it without an import cycle.
# --------------------------------------------------------------------------------------------
u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_dirty_log(ctypes.Structure):
    # The union { void *dirty_bitmap; __u64 padding2; } is carried as its u64 member.
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_dirty_gfn(ctypes.Structure):
    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64) for name in ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split())
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; the entries follow it (flexible array member)."""

    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; `indices[nmsrs]` follows it."""

    _fields_ = [("nmsrs", u32)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


# struct kvm_run: only the parts this project reads. The exit union starts at offset 32 and is
# 256 bytes; kvm_valid_regs follows it. Offsets are checked against the header.
class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("fail_entry", kvm_run_fail_entry),
        ("system_event", kvm_run_system_event),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * 2048),  # union { struct kvm_sync_regs regs; char padding[2048]; }
    ]


# --------------------------------------------------------------------------------------------
# ioctls
# --------------------------------------------------------------------------------------------
# system (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)  # also accepted on a VM fd, which answers for that VM
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _io(0xC7)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_GET_TSC_KHZ = _io(0xA3)
# struct kvm_vcpu_events differs per architecture (x86's in arch/x86_64/uapi.py, arm64's in
# arch/aarch64/uapi.py) but is 64 bytes on both, so the ioctl numbers are shared; the header check
# holds both layouts to 64 bytes.
_VCPU_EVENTS_SIZE = 64
KVM_GET_VCPU_EVENTS = _ior(0x9F, _VCPU_EVENTS_SIZE)
KVM_SET_VCPU_EVENTS = _iow(0xA0, _VCPU_EVENTS_SIZE)

# --------------------------------------------------------------------------------------------
# Capabilities (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP)
# --------------------------------------------------------------------------------------------
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_XSAVE2 = 208
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
# Mainline 6.2+. The seed's v7 patch proposed 224; upstream 224 is KVM_CAP_S390_ZPCI_OP.
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_CAP_MP_STATE = 14
KVM_CAP_VCPU_EVENTS = 41

# --------------------------------------------------------------------------------------------
# Flags and enums
# --------------------------------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1  # never used: R4b

# Defined once, in the ring harvester's package (the C shim's header mirrors them); the header
# check and tests/ringreader/test_rr_flags.py hold all three to <linux/kvm.h>.
KVM_DIRTY_GFN_F_DIRTY = ringreader.DIRTY_GFN_F_DIRTY
KVM_DIRTY_GFN_F_RESET = ringreader.DIRTY_GFN_F_RESET
KVM_DIRTY_GFN_F_MASK = ringreader.DIRTY_GFN_F_MASK
# Page offset of the dirty ring in the vCPU fd's mmap. x86's asm/kvm.h has it; arm64 headers
# before 6.2 lack it (and `#ifdef` code then silently uses 0), so the value is ours to define.
KVM_DIRTY_LOG_PAGE_OFFSET = 64

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_MP_STATE_RUNNABLE = 0


# Exported for the header check: name -> value of every integer constant defined above whose C
# name is the same. Constants absent from Debian 12's 6.1 headers are checked only against newer
# ones.
NEWER_THAN_HOST_HEADERS = frozenset({"KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP"})

STRUCTS: dict[str, type[ctypes.Structure]] = {
    "kvm_userspace_memory_region": kvm_userspace_memory_region,
    "kvm_enable_cap": kvm_enable_cap,
    "kvm_dirty_log": kvm_dirty_log,
    "kvm_clear_dirty_log": kvm_clear_dirty_log,
    "kvm_dirty_gfn": kvm_dirty_gfn,
    "kvm_regs": kvm_regs,
    "kvm_segment": kvm_segment,
    "kvm_dtable": kvm_dtable,
    "kvm_sregs": kvm_sregs,
    "kvm_cpuid_entry2": kvm_cpuid_entry2,
    "kvm_cpuid2": kvm_cpuid2,
    "kvm_msr_list": kvm_msr_list,
    "kvm_mp_state": kvm_mp_state,
    "kvm_run": kvm_run,
}

# Fields whose C name differs from ours (unions carried as one member, anonymous unions).
# struct -> our field -> C member expression for offsetof().
C_FIELD_NAMES: dict[str, dict[str, str]] = {
    "kvm_dirty_log": {"dirty_bitmap": "dirty_bitmap"},
    "kvm_clear_dirty_log": {"dirty_bitmap": "dirty_bitmap"},
    "kvm_run": {"exit": "io"},
}
# Fields that are ours only and have no C counterpart to check (none today).
UNCHECKED_FIELDS: dict[str, frozenset[str]] = {}


def constants() -> dict[str, int]:
    """Every KVM_* integer constant defined in this module, by its C name."""
    return {
        name: value
        for name, value in globals().items()
        if name.startswith("KVM_") and isinstance(value, int) and not isinstance(value, bool)
    }


# --------------------------------------------------------------------------------------------
# Device control, ONE_REG, IRQ lines: generic <linux/kvm.h>, used by the arm64 path (whose own
# names are in migrated/kvm/arch/aarch64/uapi.py) and by Vm.irq_line.
# --------------------------------------------------------------------------------------------


class kvm_one_reg(ctypes.Structure):
    _fields_ = [("id", u64), ("addr", u64)]


class kvm_reg_list(ctypes.Structure):
    """Header only; `reg[n]` (u64 register ids) follows it."""

    _fields_ = [("n", u64)]


class kvm_create_device(ctypes.Structure):
    _fields_ = [("type", u32), ("fd", u32), ("flags", u32)]


class kvm_device_attr(ctypes.Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class kvm_irq_level(ctypes.Structure):
    # union { __u32 irq; __s32 status; } is carried as its `irq` member.
    _fields_ = [("irq", u32), ("level", u32)]


# ioctls
KVM_IRQ_LINE = _iow(0x61, kvm_irq_level)
KVM_GET_ONE_REG = _iow(0xAB, kvm_one_reg)  # sic: both are _IOW in the header
KVM_SET_ONE_REG = _iow(0xAC, kvm_one_reg)
KVM_GET_REG_LIST = _iowr(0xB0, kvm_reg_list)
KVM_CREATE_DEVICE = _iowr(0xE0, kvm_create_device)
KVM_SET_DEVICE_ATTR = _iow(0xE1, kvm_device_attr)
KVM_GET_DEVICE_ATTR = _iow(0xE2, kvm_device_attr)  # sic: _IOW, the value goes out via addr
KVM_HAS_DEVICE_ATTR = _iow(0xE3, kvm_device_attr)

# Capabilities
KVM_CAP_ONE_REG = 70
KVM_CAP_ARM_PSCI = 87
KVM_CAP_DEVICE_CTRL = 89
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_ARM_IRQ_LINE_LAYOUT_2 = 174

# KVM_CREATE_DEVICE types (enum kvm_device_type) and flags
KVM_DEV_TYPE_ARM_VGIC_V3 = 7
KVM_DEV_TYPE_ARM_VGIC_ITS = 8
KVM_CREATE_DEVICE_TEST = 1

# arm64 MP states (KVM_GET/SET_MP_STATE): "The only states that are valid are
# KVM_MP_STATE_STOPPED and KVM_MP_STATE_RUNNABLE" (+ SUSPENDED with KVM_CAP_ARM_SYSTEM_SUSPEND).
KVM_MP_STATE_STOPPED = 5
KVM_MP_STATE_SUSPENDED = 10

# ONE_REG id encoding (linux/kvm.h)
KVM_REG_ARCH_MASK = 0xFF00000000000000
KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_SIZE_U8 = 0x0000000000000000
KVM_REG_SIZE_U16 = 0x0010000000000000
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_U128 = 0x0040000000000000
KVM_REG_SIZE_U256 = 0x0050000000000000
KVM_REG_SIZE_U512 = 0x0060000000000000
KVM_REG_SIZE_U1024 = 0x0070000000000000
KVM_REG_SIZE_U2048 = 0x0080000000000000


STRUCTS.update(
    {
        "kvm_one_reg": kvm_one_reg,
        "kvm_reg_list": kvm_reg_list,
        "kvm_create_device": kvm_create_device,
        "kvm_device_attr": kvm_device_attr,
        "kvm_irq_level": kvm_irq_level,
    }
)
