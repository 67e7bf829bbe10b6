"""The x86 machine state in its flat form: each vCPU's registers travel as one block, the bytes
of that vCPU's save buffers as KVM filled them (statebuffers.py `block_layout`), and go back into
the target's restore buffers with one copy.

Why: the state is saved and restored inside the downtime, where every line of Python runs cold.
The map form (state.py `to_wire`) builds a dozen objects per vCPU on the source and checks and
copies them one by one on the target; measured in migrations here that Python cost more than the
ioctls. This form is what the negotiated capability FLAT_MACHINE_STATE (migrated/peer.py) sends;
the target reads both.

A flat state, as msgpack gives it:

    version, cpu_vendor, cpu_signature    as the map form
    lapic, xsave_bytes, msr_count         the blocks' shape: one for every vCPU
    vcpus: [{index, tsc_khz, cpuid, block}, ...]   cpuid: its struct kvm_cpuid_entry2s back to back
    irqchip, pit2, clock                  as the map form

A block is checked before anything of it reaches KVM: its size for the shape, the MP state, the
MSR list's count, indices (each once, known to this host's KVM) and order (IA32_TSC first,
IA32_TSC_DEADLINE last, as `restore_msr_order` writes them; a source saves them so, fixed.py);
the struct bytes themselves are KVM's to judge, as in the map form.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import time
from typing import Any

from ...saved_state import RestoreReport, StateFormatError, WireReader
from ...vm import Vm
from .cpu import (
    CPUID_ENTRY_BYTES,
    MAX_CPUID_ENTRIES,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    finish_set_msrs,
    msr_entries,
    msrs_read_short,
)
from .fixed import HostFacts, cpuid_table_is_set, cpuid_table_of, host_facts, tsc_khz_of, vm_xsave2_bytes
from .state import (
    EVENTS_SET_FLAGS,
    MAX_MSRS,
    MAX_VCPUS,
    X86_MP_STATES,
    require_parked,
    check_cpu,
    check_host_has,
    check_restorable,
    cpu_vendor_field,
    cpuid_entries,
    restore_tsc_khz_and_cpuid,
    restore_vm_devices,
    save_vm_devices,
    vm_devices,
)
from .devices import check_devices, detect_devices
from .statebuffers import (
    MIN_XSAVE_BYTES,
    MSRS_HEADER_BYTES,
    BlockLayout,
    block_layout,
    restore_plan,
    save_plan,
)

_KEYS = frozenset("version cpu_vendor cpu_signature lapic xsave_bytes msr_count vcpus irqchip pit2 clock".split())
_VCPU_KEYS = frozenset("index tsc_khz cpuid block".split())
MAX_XSAVE_BYTES = 64 << 10  # as the map form (state.py)

_W = WireReader("x86 flat state")


def save_flat(vm: Vm, *, irqchip: bool, pit: bool) -> dict[str, Any]:
    """The whole machine's state in the flat form. Every vCPU parked (`vm.pause()`)."""
    require_parked(vm.vcpus, "saving")
    if not vm.vcpus:
        raise StateFormatError("the VM has no vCPUs to save")
    check_devices(vm, irqchip, pit, "save_flat")
    host = host_facts(vm.kvm)
    xsave2 = vm_xsave2_bytes(vm)
    indices = host.msr_indices
    vcpus = []
    layout: BlockLayout | None = None
    for vcpu in vm.vcpus:
        plan = save_plan(vcpu, irqchip, xsave2, indices)  # made at the build (machine.py)
        if plan.batch.run() == plan.msrs_at:
            raise msrs_read_short(vcpu, indices, plan.batch.result(plan.msrs_at))
        layout = plan.layout
        vcpus.append(
            {
                "index": vcpu.index,
                "tsc_khz": tsc_khz_of(vcpu),
                "cpuid": cpuid_table_of(vcpu),
                "block": bytes(plan.block),
            }
        )
    assert layout is not None
    chips, pit2, clock = save_vm_devices(vm, irqchip, pit)
    return {
        **_W.header(),
        "cpu_vendor": host.cpu_vendor,
        "cpu_signature": host.cpu_signature,
        "lapic": layout.lapic,
        "xsave_bytes": layout.xsave_bytes,
        "msr_count": layout.msr_count,
        "vcpus": vcpus,
        "irqchip": list(chips),
        "pit2": pit2,
        "clock": clock,
    }


class _Vcpu:
    """One vCPU of a flat state, checked."""

    __slots__ = ("index", "tsc_khz", "cpuid", "block", "msr_indices")

    def __init__(self, d: object, where: str, layout: BlockLayout, host: HostFacts) -> None:
        m = _W.mapping(d, where, _VCPU_KEYS)
        self.index = _W.int_field(m, "index", where, 0, MAX_VCPUS - 1)
        self.tsc_khz = _W.int_field(m, "tsc_khz", where, 0, (1 << 32) - 1)
        self.cpuid = _W.bytes_field(m, "cpuid", where)  # checked entry by entry by `entries`
        self.block = block = _W.bytes_field(m, "block", where)
        if len(block) != layout.size:
            raise _W.error(
                where,
                "block",
                f"{len(block)} bytes, expected {layout.size} for lapic={layout.lapic}, "
                f"xsave_bytes={layout.xsave_bytes}, msr_count={layout.msr_count}",
            )
        (mp_state,) = struct.unpack_from("<I", block, layout.offsets["MP_STATE"])
        if mp_state not in X86_MP_STATES:
            raise _W.error(where, "block", f"MP state {mp_state} is not an x86 KVM_MP_STATE_* value")
        at = layout.offsets["MSRS"]
        (count,) = struct.unpack_from("<I", block, at)
        if count != layout.msr_count:
            raise _W.error(where, "block", f"its MSR list says {count} entries, the shape {layout.msr_count}")
        self.msr_indices = _msr_indices(layout.msr_count).unpack_from(block, at + MSRS_HEADER_BYTES)
        if self.msr_indices == host.msr_indices:
            return  # each once, and in restore order (fixed.py)
        if len(set(self.msr_indices)) != len(self.msr_indices):
            raise _W.error(where, "block", "an MSR appears twice")
        for msr, place, name in ((MSR_IA32_TSC, 0, "first"), (MSR_IA32_TSC_DEADLINE, -1, "last")):
            if msr in self.msr_indices and self.msr_indices[place] != msr:
                raise _W.error(where, "block", f"MSR {msr:#x} must come {name} (the order KVM takes them back)")

    def entries(self, where: str) -> tuple[bytes, ...]:
        """The CPUID table as entries, checked as the map form's (state.py `cpuid_entries`)."""
        table = self.cpuid
        if not 0 < len(table) <= CPUID_ENTRY_BYTES * MAX_CPUID_ENTRIES or len(table) % CPUID_ENTRY_BYTES:
            raise _W.error(
                where,
                "cpuid",
                f"{len(table)} bytes: 1 to {MAX_CPUID_ENTRIES} entries of {CPUID_ENTRY_BYTES} (struct kvm_cpuid_entry2)",
            )
        chunks = [table[at : at + CPUID_ENTRY_BYTES] for at in range(0, len(table), CPUID_ENTRY_BYTES)]
        return cpuid_entries({"cpuid": chunks}, where)


@functools.cache
def _msr_indices(count: int) -> struct.Struct:
    """The indices of `count` struct kvm_msr_entry (u32 index, u32 reserved, u64 data)."""
    return struct.Struct("<" + "I12x" * count)


def restore_flat(vm: Vm, wire: object) -> RestoreReport:
    """A flat state into `vm`, built like the source and never run; guest RAM in place (R9).
    Checks everything first (a bad state leaves the vCPUs as they were), then writes.

    Timed with bare clock reads, not StepTimes' context managers: on this project's hosts each
    of those cost a few microseconds of the downtime."""
    now = time.perf_counter
    start = now()
    layout, vcpus, (chips, pit2, clock), cpuids = _checked(vm, wire)
    checked = now()
    xsave2 = vm_xsave2_bytes(vm)
    kept: list[tuple[int, int]] = []
    buffers = ioctls = 0.0
    for vcpu, vcpu_state, cpuid in zip(vm.vcpus, vcpus, cpuids):
        restore_tsc_khz_and_cpuid(vcpu, vcpu_state.tsc_khz, cpuid, None)
        at = now()
        plan = restore_plan(vcpu, layout.lapic, max(layout.xsave_bytes, xsave2), layout.msr_count)
        _copy_block(vcpu_state.block, layout, plan.block, plan.layout)
        plan.events.flags |= EVENTS_SET_FLAGS  # as restore_vcpu_state, why there
        copied = now()
        if plan.batch.run() == plan.msrs_at:
            msrs = msr_entries(plan.msrs, layout.msr_count)
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


def _checked(
    vm: Vm, wire: object
) -> tuple[BlockLayout, tuple[_Vcpu, ...], tuple[tuple[bytes, ...], bytes, bytes], list[tuple[bytes, ...] | None]]:
    """Everything of a flat state checked, against the wire's bounds and this host and VM: the
    blocks' layout, the vCPUs, the VM-wide parts, and per vCPU the CPUID entries to set (None:
    the table it was built with, the description's: nothing to check or set)."""
    _W.read_header(wire)
    m = _W.mapping(wire, "", _KEYS)
    vendor = cpu_vendor_field(m)
    signature = _W.int_field(m, "cpu_signature", "", 0, (1 << 32) - 1)
    lapic = m["lapic"]
    if not isinstance(lapic, bool):
        raise _W.error("", "lapic", f"expected true or false, got {lapic!r}")
    xsave_bytes = _W.int_field(m, "xsave_bytes", "", MIN_XSAVE_BYTES, MAX_XSAVE_BYTES)
    if xsave_bytes % 4:
        raise _W.error("", "xsave_bytes", f"{xsave_bytes}: a multiple of 4 (struct kvm_xsave)")
    layout = block_layout(lapic, xsave_bytes, _W.int_field(m, "msr_count", "", 0, MAX_MSRS))
    host = host_facts(vm.kvm)
    vcpus = _W.vcpus(m, MAX_VCPUS, lambda d, where: _Vcpu(d, where, layout, host))
    devices = chips, pit2, _ = vm_devices(m)
    if lapic != bool(chips):
        raise _W.error("", "lapic", f"{lapic}, but the state has {'an' if chips else 'no'} in-kernel irqchip")
    check_cpu(vendor, signature, host)
    saved_msrs = vcpus[0].msr_indices
    for vcpu_state in vcpus[1:]:
        if vcpu_state.msr_indices != saved_msrs:
            raise _W.error(f"vcpus[{vcpu_state.index}]", "block", "its MSRs differ from vCPU 0's")
    unknown = [] if host.known_msrs.issuperset(saved_msrs) else sorted({*saved_msrs} - host.known_msrs)
    check_host_has(unknown, xsave_bytes, bool(chips), bool(pit2), host)
    check_restorable(vm, len(vcpus), (bool(chips), bool(pit2)), detect_devices(vm))
    cpuids = [
        None if cpuid_table_is_set(vcpu, state.cpuid) else state.entries(f"vcpus[{vcpu.index}]")
        for vcpu, state in zip(vm.vcpus, vcpus)
    ]
    return layout, vcpus, devices, cpuids


def _copy_block(
    block: bytes, layout: BlockLayout, into: ctypes.Array[ctypes.c_uint8], into_layout: BlockLayout
) -> None:
    """A vCPU's block into a restore plan's: one copy for the same shape; else part by part, the
    XSAVE area zero-padded to the plan's size (KVM_SET_XSAVE reads that many bytes, api.rst 4.43)."""
    if layout is into_layout:  # block_layout gives one object per shape
        ctypes.memmove(into, block, layout.size)
        return
    base = ctypes.addressof(into)
    for name, at in layout.offsets.items():
        size = layout.sizes[name]
        to = into_layout.offsets[name]
        ctypes.memmove(base + to, block[at : at + size], size)
        if into_layout.sizes[name] > size:
            ctypes.memset(base + to + size, 0, into_layout.sizes[name] - size)


def zero_flat_xsave(wire: dict[str, Any]) -> None:
    """Every vCPU's XSAVE area in a flat state `save_flat` made, zeroed (a test fault's)."""
    layout = block_layout(wire["lapic"], wire["xsave_bytes"], wire["msr_count"])
    at, size = layout.offsets["XSAVE"], layout.sizes["XSAVE"]
    for vcpu in wire["vcpus"]:
        block = bytearray(vcpu["block"])
        block[at : at + size] = bytes(size)
        vcpu["block"] = bytes(block)
