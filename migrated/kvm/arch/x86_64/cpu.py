"""x86 vCPU registers KVM keeps outside kvm_regs/kvm_sregs: MSRs, the CPUID table, XSAVE's size,
the TSC frequency; and the CPU model a saved state came from."""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ... import uapi
from ..._libc import ioctl
from ...errors import KvmIoctlError
from ...saved_state import StateError
from ...vcpu import Vcpu
from . import uapi as x86_uapi


MAX_CPUID_ENTRIES = 256  # KVM_MAX_CPUID_ENTRIES


MSR_IA32_TSC = 0x10


MSR_IA32_TSC_DEADLINE = 0x6E0


# Names for messages; any other MSR is shown by number alone.
MSR_NAMES: dict[int, str] = {
    0x10: "IA32_TSC",
    0x1B: "IA32_APIC_BASE",
    0x3B: "IA32_TSC_ADJUST",
    0x10A: "IA32_ARCH_CAPABILITIES",
    0x174: "IA32_SYSENTER_CS",
    0x175: "IA32_SYSENTER_ESP",
    0x176: "IA32_SYSENTER_EIP",
    0x1A0: "IA32_MISC_ENABLE",
    0x277: "IA32_PAT",
    0x6E0: "IA32_TSC_DEADLINE",
    0xC0000080: "EFER",
    0xC0000081: "STAR",
    0xC0000082: "LSTAR",
    0xC0000083: "CSTAR",
    0xC0000084: "SFMASK",
    0xC0000100: "FS_BASE",
    0xC0000101: "GS_BASE",
    0xC0000102: "KERNEL_GS_BASE",
    0xC0000103: "TSC_AUX",
    0x4B564D00: "KVM_WALL_CLOCK_NEW",
    0x4B564D01: "KVM_SYSTEM_TIME_NEW",
    0x4B564D02: "KVM_ASYNC_PF_EN",
    0x4B564D03: "KVM_STEAL_TIME",
    0x4B564D04: "KVM_PV_EOI_EN",
    0x4B564D05: "KVM_POLL_CONTROL",
    0x4B564D06: "KVM_ASYNC_PF_INT",
    0x4B564D07: "KVM_ASYNC_PF_ACK",
}


def msr_name(index: int) -> str:
    name = MSR_NAMES.get(index)
    return f"MSR {index:#x} ({name})" if name else f"MSR {index:#x}"


@dataclass(frozen=True)
class CpuModel:
    """Vendor and family/model/stepping, from CPUID leaf 0 and leaf 1 EAX."""

    vendor: str
    family: int
    model: int
    stepping: int

    @classmethod
    def from_cpuid(cls, vendor: bytes, signature: int) -> CpuModel:
        base_family = signature >> 8 & 0xF
        base_model = signature >> 4 & 0xF
        family = base_family + (signature >> 20 & 0xFF) if base_family == 0xF else base_family
        model = base_model | (signature >> 16 & 0xF) << 4 if base_family in (0x6, 0xF) else base_model
        return cls(vendor.decode("ascii", "replace"), family, model, signature & 0xF)

    def __str__(self) -> str:
        return f"{self.vendor} family {self.family:#x} model {self.model:#x} stepping {self.stepping}"


def cpu_identity(entries: Sequence[uapi.kvm_cpuid_entry2]) -> tuple[bytes, int]:
    """(vendor string, leaf 1 EAX signature) from CPUID entries."""
    leaves = {(e.function, e.index): e for e in entries}
    leaf0, leaf1 = leaves.get((0, 0)), leaves.get((1, 0))
    if leaf0 is None or leaf1 is None:
        raise StateError("the CPUID lacks leaf 0 or leaf 1: cannot tell the CPU vendor and model")
    return struct.pack("<III", leaf0.ebx, leaf0.edx, leaf0.ecx), int(leaf1.eax)


def xsave2_size(fd: int) -> int:
    """KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2): the bytes KVM_GET_XSAVE2 and KVM_SET_XSAVE use, asked
    of a VM fd as api.rst says (or of /dev/kvm); 0 where KVM has no KVM_GET_XSAVE2."""
    try:
        return ioctl(fd, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_XSAVE2)
    except OSError as err:
        raise KvmIoctlError("KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)", err) from err


# struct kvm_msrs (u32 nmsrs, u32 pad) and its struct kvm_msr_entry (u32 index, u32 reserved, u64
# data), packed and unpacked in one call each rather than field by field through ctypes: these
# run in the downtime, once per vCPU each way.
_MSRS_HEADER_BYTES = ctypes.sizeof(x86_uapi.kvm_msrs)
_MSR_ENTRY_BYTES = ctypes.sizeof(x86_uapi.kvm_msr_entry)


def msr_buffer(entries: Sequence[tuple[int, int]]) -> ctypes.Array[ctypes.c_uint8]:
    """A `struct kvm_msrs` holding `entries` ((index, data) pairs)."""
    buf = (ctypes.c_uint8 * (_MSRS_HEADER_BYTES + _MSR_ENTRY_BYTES * len(entries)))()
    pack_msrs_into(buf, entries)
    return buf


def pack_msrs_into(buf: ctypes.Array[ctypes.c_uint8], entries: Sequence[tuple[int, int]]) -> None:
    """`entries` into a `msr_buffer` made for exactly as many."""
    count = len(entries)
    flat = [field for index, value in entries for field in (index, 0, value)]
    struct.pack_into(f"<I{_MSRS_HEADER_BYTES - 4}x" + "IIQ" * count, buf, 0, count, *flat)


def msr_entries(buf: ctypes.Array[ctypes.c_uint8], count: int) -> list[tuple[int, int]]:
    """The first `count` (index, data) pairs of a `msr_buffer`."""
    fields = struct.unpack_from("<" + "IIQ" * count, buf, _MSRS_HEADER_BYTES)
    return list(zip(fields[0::3], fields[2::3]))


def get_msrs(vcpu: Vcpu, indices: Sequence[int]) -> list[tuple[int, int]]:
    """KVM_GET_MSRS: (index, value) of each MSR, in order. Names the first one KVM refused."""
    buf = msr_buffer([(index, 0) for index in indices])
    done = vcpu.ioctl("KVM_GET_MSRS", x86_uapi.KVM_GET_MSRS, buf)
    if done != len(indices):
        raise msrs_read_short(vcpu, indices, done)
    return msr_entries(buf, len(indices))


def msrs_read_short(vcpu: Vcpu, indices: Sequence[int], done: int) -> StateError:
    """The error of a KVM_GET_MSRS of `indices` that read only `done` of them."""
    return StateError(
        f"vCPU {vcpu.index}: KVM_GET_MSRS read {done} of {len(indices)} MSRs: "
        f"{msr_name(indices[done])} could not be read"
    )


def set_msrs(vcpu: Vcpu, entries: Sequence[tuple[int, int]]) -> list[int]:
    """KVM_SET_MSRS, in the order given; returns the MSRs KVM refused although they already hold
    the value asked for.

    KVM stops at the first MSR it refuses and returns how many it set. A refused MSR that reads
    back with exactly the value asked for is already in the wanted state, and the rest is written
    on: KVM can refuse even a register's reset value (MSR_KVM_ASYNC_PF_INT = 0 without an
    in-kernel LAPIC, though KVM_GET_MSRS reads it). Any other refusal raises, naming the MSR.
    """
    done = vcpu.ioctl("KVM_SET_MSRS", x86_uapi.KVM_SET_MSRS, msr_buffer(entries))
    return finish_set_msrs(vcpu, entries, done)


def finish_set_msrs(vcpu: Vcpu, entries: Sequence[tuple[int, int]], done: int) -> list[int]:
    """`set_msrs` after its first KVM_SET_MSRS of `entries` set `done` of them (in a batch, say)."""
    kept: list[int] = []
    pending = list(entries)
    total = len(pending)
    while done != len(pending):
        index, value = pending[done]
        current = _read_msr(vcpu, index)
        if current != value:
            now = "unreadable" if current is None else f"{current:#x}"
            raise StateError(
                f"vCPU {vcpu.index}: KVM_SET_MSRS set {total - len(pending) + done} of {total} "
                f"MSRs: {msr_name(index)} = {value:#x} was refused (it holds {now})"
            )
        kept.append(index)
        pending = pending[done + 1 :]
        if not pending:
            break
        done = vcpu.ioctl("KVM_SET_MSRS", x86_uapi.KVM_SET_MSRS, msr_buffer(pending))
    return kept


def _read_msr(vcpu: Vcpu, index: int) -> int | None:
    buf = msr_buffer([(index, 0)])
    if vcpu.ioctl("KVM_GET_MSRS", x86_uapi.KVM_GET_MSRS, buf) != 1:
        return None
    return msr_entries(buf, 1)[0][1]


def restore_msr_order(msrs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """IA32_TSC first, IA32_TSC_DEADLINE last (it is relative to the TSC), the rest as saved."""
    rank = {MSR_IA32_TSC: 0, MSR_IA32_TSC_DEADLINE: 2}
    return sorted(msrs, key=lambda pair: rank.get(pair[0], 1))  # sorted() is stable


CPUID_ENTRY_BYTES = ctypes.sizeof(uapi.kvm_cpuid_entry2)
_CPUID2_HEADER_BYTES = ctypes.sizeof(uapi.kvm_cpuid2)


def get_cpuid_bytes(vcpu: Vcpu) -> tuple[bytes, ...]:
    """KVM_GET_CPUID2: the vCPU's own CPUID table (what was set, plus KVM's runtime updates), each
    entry as the raw bytes of its struct kvm_cpuid_entry2, sliced from the buffer in one pass (the
    state keeps them so; building ctypes objects per entry cost more than the ioctl)."""
    buf = (ctypes.c_uint8 * (_CPUID2_HEADER_BYTES + CPUID_ENTRY_BYTES * MAX_CPUID_ENTRIES))()
    uapi.kvm_cpuid2.from_buffer(buf).nent = MAX_CPUID_ENTRIES
    try:
        vcpu.ioctl("KVM_GET_CPUID2", x86_uapi.KVM_GET_CPUID2, buf)
    except KvmIoctlError as err:
        if err.errno == errno.E2BIG:
            raise StateError(f"vCPU {vcpu.index}: its CPUID has more than {MAX_CPUID_ENTRIES} entries") from err
        raise
    count = uapi.kvm_cpuid2.from_buffer(buf).nent
    raw = bytes(buf)
    end = _CPUID2_HEADER_BYTES + CPUID_ENTRY_BYTES * count
    return tuple(raw[at : at + CPUID_ENTRY_BYTES] for at in range(_CPUID2_HEADER_BYTES, end, CPUID_ENTRY_BYTES))


def get_cpuid(vcpu: Vcpu) -> list[uapi.kvm_cpuid_entry2]:
    """KVM_GET_CPUID2 as structs (`get_cpuid_bytes`)."""
    return [uapi.kvm_cpuid_entry2.from_buffer_copy(entry) for entry in get_cpuid_bytes(vcpu)]


def cpuid_buffer_of(entries: Sequence[bytes]) -> ctypes.Array[ctypes.c_uint8]:
    """A `struct kvm_cpuid2` for KVM_SET_CPUID2 from raw struct kvm_cpuid_entry2 bytes, copied in
    one piece."""
    raw = b"".join(entries)
    if len(raw) != CPUID_ENTRY_BYTES * len(entries):
        raise ValueError(f"CPUID entries must be {CPUID_ENTRY_BYTES} bytes each (struct kvm_cpuid_entry2)")
    buf = (ctypes.c_uint8 * (_CPUID2_HEADER_BYTES + len(raw)))()
    uapi.kvm_cpuid2.from_buffer(buf).nent = len(entries)
    ctypes.memmove(ctypes.addressof(buf) + _CPUID2_HEADER_BYTES, raw, len(raw))
    return buf


def read_tsc_khz(vcpu: Vcpu) -> int:
    try:
        return ioctl(vcpu.fd, uapi.KVM_GET_TSC_KHZ, 0)
    except OSError as err:
        if err.errno == errno.EIO:  # api.rst: "If the host has unstable tsc ... -EIO"
            return 0
        raise KvmIoctlError(f"vCPU {vcpu.index}: KVM_GET_TSC_KHZ", err) from err


def set_xcr0(vcpu: Vcpu, value: int) -> None:
    """KVM_SET_XCRS with XCR0 alone (a loader sets it for a guest that cannot `xsetbv` itself)."""
    xcrs = x86_uapi.kvm_xcrs(nr_xcrs=1)
    xcrs.xcrs[0].xcr = 0
    xcrs.xcrs[0].value = value
    vcpu.ioctl(f"KVM_SET_XCRS (XCR0 = {value:#x})", x86_uapi.KVM_SET_XCRS, xcrs)
