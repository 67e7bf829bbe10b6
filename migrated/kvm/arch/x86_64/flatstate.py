"""The x86 machine state in its flat form: each vCPU's registers travel as one block, the bytes
of that vCPU's save buffers as KVM filled them (statebuffers.py `block_layout`), and go back into
the target's restore buffers with one copy.

Why: the state is saved and restored inside the downtime, where every line of Python runs cold.
The map form (state.py `to_wire`) builds a dozen objects per vCPU on the source and checks and
copies them one by one on the target; measured in migrations here that Python cost more than the
ioctls. This form is what the negotiated capability FLAT_MACHINE_STATE (migrated/peer.py) sends;
the target reads both.

A flat state is one record of bytes, little-endian, no msgpack (its DeviceState blob as is):

    header  (40 bytes) magic b"MX86", version (u16), flags (u16: LAPIC and irqchips; PIT), vCPU
            count, the blocks' shape (XSAVE bytes, MSR count), CPU signature, 0 (u32 each),
            CPU vendor (12 bytes)
    per vCPU, in index order:
            index, tsc_khz, CPUID bytes, 0   (u32 each)
            its CPUID table: struct kvm_cpuid_entry2s back to back
            its block (statebuffers.py `block_layout` for the shape)
    VM-wide: 3 struct kvm_irqchip (PIC master, slave, IOAPIC) with the LAPIC flag,
            struct kvm_pit_state2 with the PIT flag, struct kvm_clock_data

and nothing after. Every length is known from the header and the vCPUs' CPUID sizes before a byte
is read from where it says. A block is checked before anything of it reaches KVM: the MP state,
the MSR list's count, indices (each once, known to this host's KVM) and order (IA32_TSC first,
IA32_TSC_DEADLINE last, as `restore_msr_order` writes them; a source saves them so, fixed.py);
the struct bytes themselves are KVM's to judge, as in the map form.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import time

from ...saved_state import RestoreReport, StateError, StateFormatError
from ...vcpu import Vcpu
from ...vm import Vm
from . import uapi as x86_uapi
from .cpu import (
    CPUID_ENTRY_BYTES,
    MAX_CPUID_ENTRIES,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    finish_set_msrs,
    msr_entries,
    msrs_read_short,
)
from .fixed import (
    HostFacts,
    cpuid_table_is_set,
    cpuid_table_of,
    host_facts,
    refused_msrs_of,
    tsc_khz_of,
    vm_xsave2_bytes,
)
from .state import (
    EVENTS_SET_FLAGS,
    MAX_MSRS,
    MAX_VCPUS,
    MAX_XSAVE_BYTES,
    X86_MP_STATES,
    require_parked,
    check_cpu,
    check_host_has,
    check_restorable,
    cpuid_entries,
    restore_tsc_khz_and_cpuid,
    restore_vm_devices,
    save_vm_devices,
)
from .devices import check_devices, detect_devices
from .statebuffers import (
    IRQCHIP_IDS,
    MIN_XSAVE_BYTES,
    MSR_ENTRY_BYTES,
    MSR_VALUE_OFFSET,
    MSRS_HEADER_BYTES,
    BlockLayout,
    VcpuRestore,
    block_layout,
    restore_plan,
    save_plan,
)

MAGIC = b"MX86"
VERSION = 1  # bumped when the record changes; a target refuses a newer one, naming it
FLAG_LAPIC = 1  # in-kernel irqchip: a LAPIC part in each block, and the 3 irqchips
FLAG_PIT = 2
_HEADER = struct.Struct("<4sHHIIIII12s")  # magic version flags vcpus xsave msrs signature 0 vendor
_VCPU = struct.Struct("<IIII")  # index tsc_khz cpuid_bytes 0
_CHIP_BYTES = ctypes.sizeof(x86_uapi.kvm_irqchip)
_PIT_BYTES = ctypes.sizeof(x86_uapi.kvm_pit_state2)
_CLOCK_BYTES = ctypes.sizeof(x86_uapi.kvm_clock_data)
_U32 = struct.Struct("<I")  # an MP state, an MSR list's count, an irqchip's chip_id
_U64 = struct.Struct("<Q")  # an MSR's value


def save_flat(vm: Vm, *, irqchip: bool, pit: bool) -> bytes:
    """The whole machine's state as a flat record. Every vCPU parked (`vm.pause()`)."""
    require_parked(vm.vcpus, "saving")
    if not vm.vcpus:
        raise StateError("the VM has no vCPUs to save")
    check_devices(vm, irqchip, pit, "save_flat")
    host = host_facts(vm.kvm)
    xsave2 = vm_xsave2_bytes(vm)
    indices = host.msr_indices
    parts: list[bytes] = [b""]  # the header, once the shape is known
    layout: BlockLayout | None = None
    for vcpu in vm.vcpus:
        plan = save_plan(vcpu, irqchip, xsave2, indices)  # made at the build (machine.py)
        if plan.batch.run() == plan.msrs_at:
            raise msrs_read_short(vcpu, indices, plan.batch.result(plan.msrs_at))
        layout = plan.layout
        cpuid = cpuid_table_of(vcpu)
        parts += (_VCPU.pack(vcpu.index, tsc_khz_of(vcpu), len(cpuid), 0), cpuid, bytes(plan.block))
    assert layout is not None
    chips, pit2, clock = save_vm_devices(vm, irqchip, pit)
    flags = (FLAG_LAPIC if layout.lapic else 0) | (FLAG_PIT if pit2 else 0)
    parts[0] = _HEADER.pack(
        MAGIC,
        VERSION,
        flags,
        len(vm.vcpus),
        layout.xsave_bytes,
        layout.msr_count,
        host.cpu_signature,
        0,
        host.cpu_vendor,
    )
    return b"".join((*parts, *chips, pit2, clock))


def _fail(where: str, message: str) -> StateFormatError:
    return StateFormatError(f"x86 flat state: {where}: {message}")


class _Vcpu:
    """One vCPU of a flat record, checked: its fields, and views of its CPUID table and block."""

    __slots__ = ("index", "tsc_khz", "cpuid", "block", "msr_indices", "end")

    def __init__(self, record: memoryview, at: int, position: int, layout: BlockLayout, host: HostFacts) -> None:
        where = f"vcpus[{position}]"
        if at + _VCPU.size > len(record):
            raise _fail(where, f"the record ends at byte {len(record)}, inside this vCPU's header")
        self.index, self.tsc_khz, cpuid_bytes, zero = _VCPU.unpack_from(record, at)
        if self.index != position:
            raise _fail(f"{where}.index", f"{self.index}, expected {position}")
        if zero:
            raise _fail(where, "reserved header bytes are not zero")
        if not 0 < cpuid_bytes <= CPUID_ENTRY_BYTES * MAX_CPUID_ENTRIES or cpuid_bytes % CPUID_ENTRY_BYTES:
            raise _fail(
                f"{where}.cpuid",
                f"{cpuid_bytes} bytes: 1 to {MAX_CPUID_ENTRIES} entries of {CPUID_ENTRY_BYTES} (struct kvm_cpuid_entry2)",
            )
        at += _VCPU.size
        end = at + cpuid_bytes + layout.size
        if end > len(record):
            raise _fail(where, f"the record ends at byte {len(record)}, inside this vCPU (to byte {end})")
        self.cpuid = bytes(record[at : at + cpuid_bytes])
        self.block = block = record[at + cpuid_bytes : end]
        self.end = end
        (mp_state,) = _U32.unpack_from(block, layout.offsets["MP_STATE"])
        if mp_state not in X86_MP_STATES:
            raise _fail(f"{where}.block", f"MP state {mp_state} is not an x86 KVM_MP_STATE_* value")
        msrs = layout.offsets["MSRS"]
        (count,) = _U32.unpack_from(block, msrs)
        if count != layout.msr_count:
            raise _fail(f"{where}.block", f"its MSR list says {count} entries, the header {layout.msr_count}")
        self.msr_indices = _msr_indices(layout.msr_count).unpack_from(block, msrs + MSRS_HEADER_BYTES)
        if self.msr_indices == host.msr_indices:
            return  # each once, and in restore order (fixed.py)
        if len(set(self.msr_indices)) != len(self.msr_indices):
            raise _fail(f"{where}.block", "an MSR appears twice")
        for msr, place, name in ((MSR_IA32_TSC, 0, "first"), (MSR_IA32_TSC_DEADLINE, -1, "last")):
            if msr in self.msr_indices and self.msr_indices[place] != msr:
                raise _fail(f"{where}.block", f"MSR {msr:#x} must come {name} (the order KVM takes them back)")

    def entries(self) -> tuple[bytes, ...]:
        """The CPUID table as entries, checked as the map form's (state.py `cpuid_entries`)."""
        table = self.cpuid
        chunks = [table[at : at + CPUID_ENTRY_BYTES] for at in range(0, len(table), CPUID_ENTRY_BYTES)]
        return cpuid_entries({"cpuid": chunks}, f"vcpus[{self.index}]")


@functools.cache
def _msr_indices(count: int) -> struct.Struct:
    """The indices of `count` struct kvm_msr_entry (u32 index, u32 reserved, u64 data)."""
    return struct.Struct("<" + "I12x" * count)


def restore_flat(vm: Vm, record: bytes) -> RestoreReport:
    """A flat record into `vm`, built like the source and never run; guest RAM in place (R9).
    Checks everything first (a bad state leaves the vCPUs as they were), then writes.

    Timed with bare clock reads, not StepTimes' context managers: on this project's hosts each
    of those cost a few microseconds of the downtime."""
    now = time.perf_counter
    start = now()
    layout, vcpus, (chips, pit2, clock), cpuids = check_record(vm, record)
    checked = now()
    xsave2 = vm_xsave2_bytes(vm)
    kept: list[tuple[int, int]] = []
    buffers = ioctls = 0.0
    for vcpu, vcpu_state, cpuid in zip(vm.vcpus, vcpus, cpuids):
        restore_tsc_khz_and_cpuid(vcpu, vcpu_state.tsc_khz, cpuid, None)
        at = now()
        plan, count, left_out = _fill_plan(vcpu, vcpu_state, layout, xsave2)
        kept += [(vcpu.index, i) for i in left_out]
        plan.events.flags |= EVENTS_SET_FLAGS  # as restore_vcpu_state, why there
        plan.batch.expect(plan.msrs_at, count)
        copied = now()
        if plan.batch.run() == plan.msrs_at:
            msrs = msr_entries(plan.msrs, count)
            kept += [(vcpu.index, i) for i in finish_set_msrs(vcpu, msrs, plan.batch.result(plan.msrs_at))]
            plan.batch.run(plan.msrs_at + 1)
        written = now()
        buffers += copied - at
        ioctls += written - copied
    devices = now()
    restore_vm_devices(vm, chips, pit2, clock, advance_clock=False)
    end = now()
    timings = {
        "check": checked - start,
        "vcpu_buffers": buffers,
        "vcpu_ioctls": ioctls,
        "vm_ioctls": end - devices,
        "total": end - start,
    }
    return RestoreReport(timings=timings, clock_advanced=False, msrs_kept=tuple(kept))


def rehearse_restore(vm: Vm) -> float:
    """`restore_flat`'s checks and copies, up to its first write to KVM, on a record of `vm`'s
    own state: a VM built as a target, never run, its vCPUs parked. Nothing reaches KVM (the
    save's ioctls only read), and what it fills (the restore plans' buffers) the real restore
    fills again. Why: on this project's hosts every line of a restore runs cold in the downtime
    (its code, its data, their TLB entries under nested paging); run once just before the pause,
    the real one took 0.33 rather than 0.41 ms (bench/fixed_cost.py, 32 migrations each way).
    Returns the seconds it took."""
    started = time.perf_counter()
    irqchip, pit = detect_devices(vm)
    layout, vcpus, _, _ = check_record(vm, save_flat(vm, irqchip=irqchip, pit=pit))
    xsave2 = vm_xsave2_bytes(vm)
    for vcpu, vcpu_state in zip(vm.vcpus, vcpus):
        _fill_plan(vcpu, vcpu_state, layout, xsave2)
    return time.perf_counter() - started


def _fill_plan(vcpu: Vcpu, vcpu_state: _Vcpu, layout: BlockLayout, xsave2: int) -> tuple[VcpuRestore, int, list[int]]:
    """The vCPU's restore plan with its block copied in and the MSRs it refused at its build
    left out (`_leave_out_refused`): the plan, its MSR count, the MSRs left out."""
    plan = restore_plan(vcpu, layout.lapic, max(layout.xsave_bytes, xsave2), layout.msr_count)
    _copy_block(vcpu_state.block, layout, plan.block, plan.layout)
    refused = refused_msrs_of(vcpu)
    if not refused:
        return plan, layout.msr_count, []
    count, left_out = _leave_out_refused(plan, vcpu_state.msr_indices, refused)
    return plan, count, left_out


def check_record(
    vm: Vm, record: bytes
) -> tuple[BlockLayout, list[_Vcpu], tuple[tuple[bytes, ...], bytes, bytes], list[tuple[bytes, ...] | None]]:
    """Everything of a flat record checked, against its own lengths and this host and VM: the
    blocks' layout, the vCPUs, the VM-wide parts, and per vCPU the CPUID entries to set (None:
    the table it was built with, the description's: nothing to check or set)."""
    if len(record) < _HEADER.size:
        raise _fail("header", f"{len(record)} bytes, shorter than the header's {_HEADER.size}")
    magic, version, flags, count, xsave_bytes, msr_count, signature, zero, vendor = _HEADER.unpack_from(record)
    if magic != MAGIC:
        raise _fail("header", f"magic {magic!r}, expected {MAGIC!r}")
    if version > VERSION or version < 1:
        raise _fail(
            "version",
            f"{version}: this migrated reads version 1 to {VERSION}; a newer one needs migrated upgraded here",
        )
    if zero:
        raise _fail("header", "reserved bytes are not zero")
    if flags & ~(FLAG_LAPIC | FLAG_PIT):
        raise _fail("flags", f"{flags:#x}: unknown bits (known: LAPIC {FLAG_LAPIC}, PIT {FLAG_PIT})")
    lapic, pit = bool(flags & FLAG_LAPIC), bool(flags & FLAG_PIT)
    if pit and not lapic:
        raise _fail("flags", "an in-kernel PIT needs the in-kernel irqchip (absent)")
    if not 0 < count <= MAX_VCPUS:
        raise _fail("vcpus", f"{count}: 1 to {MAX_VCPUS}")
    if not MIN_XSAVE_BYTES <= xsave_bytes <= MAX_XSAVE_BYTES or xsave_bytes % 4:
        raise _fail(
            "xsave_bytes",
            f"{xsave_bytes}: a multiple of 4 from {MIN_XSAVE_BYTES} to {MAX_XSAVE_BYTES} (struct kvm_xsave)",
        )
    if msr_count > MAX_MSRS:
        raise _fail("msr_count", f"{msr_count}: at most {MAX_MSRS}")
    layout = block_layout(lapic, xsave_bytes, msr_count)
    host = host_facts(vm.kvm)
    view = memoryview(record)
    vcpus: list[_Vcpu] = []
    at = _HEADER.size
    for position in range(count):
        vcpus.append(_Vcpu(view, at, position, layout, host))
        at = vcpus[-1].end
    chips_at, end = at, at + (3 * _CHIP_BYTES if lapic else 0) + (_PIT_BYTES if pit else 0) + _CLOCK_BYTES
    if end != len(record):
        raise _fail("length", f"{len(record)} bytes; the header and the vCPUs say {end}")
    chips = tuple(
        record[chips_at + i * _CHIP_BYTES : chips_at + (i + 1) * _CHIP_BYTES] for i in range(3 if lapic else 0)
    )
    for i, (chip, chip_id) in enumerate(zip(chips, IRQCHIP_IDS)):
        (found,) = _U32.unpack_from(chip)
        if found != chip_id:
            raise _fail(f"irqchip[{i}]", f"chip_id {found}, expected {chip_id}")
    at = chips_at + len(chips) * _CHIP_BYTES
    pit2 = record[at : at + _PIT_BYTES] if pit else b""
    clock = record[end - _CLOCK_BYTES : end]
    check_cpu(vendor, signature, host)
    saved_msrs = vcpus[0].msr_indices
    for vcpu_state in vcpus[1:]:
        if vcpu_state.msr_indices != saved_msrs:
            raise _fail(f"vcpus[{vcpu_state.index}].block", "its MSRs differ from vCPU 0's")
    unknown = [] if host.known_msrs.issuperset(saved_msrs) else sorted({*saved_msrs} - host.known_msrs)
    check_host_has(unknown, xsave_bytes, lapic, pit, host)
    check_restorable(vm, count, (lapic, pit), detect_devices(vm))
    cpuids = [
        None if cpuid_table_is_set(vcpu, state.cpuid) else state.entries() for vcpu, state in zip(vm.vcpus, vcpus)
    ]
    return layout, vcpus, (chips, pit2, clock), cpuids


def _copy_block(
    block: bytes | memoryview, layout: BlockLayout, into: ctypes.Array[ctypes.c_uint8], into_layout: BlockLayout
) -> None:
    """A vCPU's block into a restore plan's: one copy for the same shape; else part by part, the
    XSAVE area zero-padded to the plan's size (KVM_SET_XSAVE reads that many bytes, api.rst 4.43)."""
    target = memoryview(into).cast("B")
    if layout is into_layout:  # block_layout gives one object per shape
        target[: layout.size] = block
        return
    for name, at in layout.offsets.items():
        size, room = layout.sizes[name], into_layout.sizes[name]
        to = into_layout.offsets[name]
        target[to : to + size] = block[at : at + size]
        target[to + size : to + room] = bytes(room - size)


def _leave_out_refused(
    plan: VcpuRestore, indices: tuple[int, ...], refused: tuple[tuple[int, int], ...]
) -> tuple[int, list[int]]:
    """The plan's MSR list without the MSRs this vCPU refused at its build whose saved values are
    the ones they hold (fixed.py `read_build_refused_msrs`): they are in that state already, and
    a KVM_SET_MSRS that reached one would stop there. A refused MSR with another value stays in,
    for KVM to refuse and `finish_set_msrs` to name. Returns the list's new count and the MSRs
    left out."""
    base = ctypes.addressof(plan.msrs)
    count = len(indices)
    left_out: list[int] = []
    for position, index, value in _refused_positions(indices, refused):
        at = MSRS_HEADER_BYTES + position * MSR_ENTRY_BYTES
        if _U64.unpack_from(plan.msrs, at + MSR_VALUE_OFFSET)[0] != value:
            continue
        ctypes.memmove(base + at, base + at + MSR_ENTRY_BYTES, (count - position - 1) * MSR_ENTRY_BYTES)
        count -= 1
        left_out.append(index)
    _U32.pack_into(plan.msrs, 0, count)
    return count, left_out


@functools.lru_cache(maxsize=64)
def _refused_positions(
    indices: tuple[int, ...], refused: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, int, int], ...]:
    """(position in `indices`, index, value) of each refused MSR the list holds, the last first:
    an entry moved out leaves the earlier ones where they were. A state's list is normally this
    host's, so one entry serves every restore."""
    at = {index: position for position, index in enumerate(indices)}
    found = [(at[index], index, value) for index, value in refused if index in at]
    return tuple(sorted(found, reverse=True))


def zero_flat_xsave(record: bytes) -> bytes:
    """`record` (from `save_flat`) with every vCPU's XSAVE area zeroed (a test fault's)."""
    _, _, flags, count, xsave_bytes, msr_count, _, _, _ = _HEADER.unpack_from(record)
    layout = block_layout(bool(flags & FLAG_LAPIC), xsave_bytes, msr_count)
    out = bytearray(record)
    at = _HEADER.size
    for _ in range(count):
        cpuid_bytes = _VCPU.unpack_from(record, at)[2]
        xsave = at + _VCPU.size + cpuid_bytes + layout.offsets["XSAVE"]
        out[xsave : xsave + xsave_bytes] = bytes(xsave_bytes)
        at += _VCPU.size + cpuid_bytes + layout.size
    return bytes(out)
