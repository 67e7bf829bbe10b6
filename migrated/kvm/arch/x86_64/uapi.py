"""The x86_64 KVM userspace API: the machine state's structs and ioctls, the in-kernel PIC, IOAPIC
and PIT, kvmclock, and the numbers only x86 uses. The common numbers are in `migrated/kvm/uapi.py`
(which keeps x86's registers and CPUID headers, for the reason given there).

`tests/kvm/test_uapi_headers.py` checks every constant and struct here against the x86_64
<linux/kvm.h> of the host and of `.ci/fetch-headers`, together with the common table, and asserts
that no name is defined in two tables.
"""

from __future__ import annotations

import ctypes

from ...uapi import _io, _ior, _iow, _iowr, kvm_cpuid2, u8, u16, u32, u64

_IMPORTED = frozenset(globals())


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; `entries[nmsrs]` (struct kvm_msr_entry) follows it."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_xsave(ctypes.Structure):
    """The first 4096 bytes; KVM_GET_XSAVE2 / KVM_SET_XSAVE use as many bytes as
    KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) says (`extra[]` follows `region`)."""

    _fields_ = [("region", u32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]  # char in C


class kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_pic_state(ctypes.Structure):
    _fields_ = [
        (name, u8)
        for name in (
            "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask "
            "init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr "
            "elcr_mask"
        ).split()
    ]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(ctypes.Structure):
    # Each redirection entry is a union { __u64 bits; struct { bitfields } fields; }, carried
    # as its u64 member.
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class kvm_irqchip_chip(ctypes.Union):
    _fields_ = [("dummy", u8 * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", kvm_irqchip_chip)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", ctypes.c_int64),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", u32),
        ("reserved", u32 * 9),
    ]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


# VM ioctls
KVM_SET_TSS_ADDR = _io(0x47)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_GET_IRQCHIP = _iowr(0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, kvm_irqchip)  # sic: the header encodes it as _IOR
KVM_CREATE_PIT2 = _iow(0x77, kvm_pit_config)
KVM_SET_CLOCK = _iow(0x7B, kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, kvm_clock_data)
KVM_GET_PIT2 = _ior(0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, kvm_pit_state2)
# vCPU ioctls
KVM_GET_CPUID2 = _iowr(0x91, kvm_cpuid2)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_GET_LAPIC = _ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, kvm_lapic_state)
KVM_GET_DEBUGREGS = _ior(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, kvm_debugregs)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, kvm_xcrs)
KVM_GET_XSAVE2 = _ior(0xCF, kvm_xsave)

# Capabilities
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_IRQCHIP = 0
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60

# MP states only x86 has (KVM_MP_STATE_RUNNABLE is common)
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_AP_RESET_HOLD = 9

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3

KVM_PIT_SPEAKER_DUMMY = 1
KVM_PIT_FLAGS_HPET_LEGACY = 0x1
KVM_PIT_FLAGS_SPEAKER_DATA_ON = 0x2

# struct kvm_clock_data.flags. KVM_GET_CLOCK reports them; KVM_SET_CLOCK acts on REALTIME only
# (api.rst: "Other flags returned by KVM_GET_CLOCK are accepted but ignored").
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

# struct kvm_vcpu_events.flags
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

# x86 layouts, by C struct name, checked against the x86_64 headers. Nested parts
# (kvm_vcpu_events' exception, kvm_irqchip's union, ...) are checked through their parents.
X86_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "kvm_msr_entry": kvm_msr_entry,
    "kvm_msrs": kvm_msrs,
    "kvm_xsave": kvm_xsave,
    "kvm_xcr": kvm_xcr,
    "kvm_xcrs": kvm_xcrs,
    "kvm_debugregs": kvm_debugregs,
    "kvm_lapic_state": kvm_lapic_state,
    "kvm_vcpu_events": kvm_vcpu_events,
    "kvm_pic_state": kvm_pic_state,
    "kvm_ioapic_state": kvm_ioapic_state,
    "kvm_irqchip": kvm_irqchip,
    "kvm_pit_config": kvm_pit_config,
    "kvm_pit_channel_state": kvm_pit_channel_state,
    "kvm_pit_state2": kvm_pit_state2,
    "kvm_clock_data": kvm_clock_data,
}


def constants() -> dict[str, int]:
    """Every KVM_* integer constant defined in this module, by its C name (the header check adds
    them to the common ones)."""
    return {
        name: value
        for name, value in globals().items()
        if name not in _IMPORTED and name.startswith("KVM_") and isinstance(value, int) and not isinstance(value, bool)
    }
