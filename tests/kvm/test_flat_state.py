"""The flat form of the x86 machine state (flatstate.py) on real KVM: saved from a running
workload guest as one record of bytes, restored into a fresh VM that carries on; the same
registers as the map form; every malformed or incompatible record refused, naming the field,
before any vCPU is written.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

import pytest

from migrated.kvm.arch.x86_64 import MSR_IA32_TSC, save_vm_state
from migrated.kvm.arch.x86_64 import uapi as x86_uapi
from migrated.kvm.arch import create_vm
from migrated.kvm.arch.x86_64.fixed import (
    cpuid_of,
    cpuid_table_is_set,
    host_facts,
    read_build_refused_msrs,
    refused_msrs_of,
    vm_xsave2_bytes,
)
from migrated.kvm.arch.x86_64.flatstate import (
    FLAG_LAPIC,
    FLAG_PIT,
    rehearse_restore,
    restore_flat,
    save_flat,
    zero_flat_xsave,
)
from migrated.kvm.arch.x86_64.statebuffers import MSR_ENTRY_BYTES, MSRS_HEADER_BYTES, block_layout, restore_plan
from migrated.kvm.saved_state import IncompatibleStateError, StateError, StateFormatError
from migrated.kvm.ioctlbatch import IoctlBatch
from migrated.kvm.system import Kvm
from migrated.kvm.vcpu import Vcpu
from migrated.kvm.vm import Vm, VmConfig
from test_x86_state import (
    MEMORY,
    assert_continued,
    assert_same_state,
    assert_vcpus_healthy,
    build_vm,
    start_workload,
    wait_guest,
)

pytestmark = pytest.mark.kvm


def _paused_source(kvm: Kvm, vcpus: int, devices: bool) -> tuple[Vm, Any, list[Any]]:
    vm = build_vm(kvm, vcpus, devices)
    guest = start_workload(vm, vcpus, devices)
    wait_guest(vm, guest, lambda st: all(s.started and s.heartbeat > 0 and s.pages_written > 0 for s in st))
    vm.pause()
    assert_vcpus_healthy(vm)
    return vm, guest, guest.status(vm.ram)


HEADER = struct.Struct("<4sHHIIIII12s")  # flatstate.py's header, as the record's reader sees it
VCPU = struct.Struct("<IIII")
# The VM-wide parts that close a record with in-kernel irqchip and PIT: 3 irqchips, PIT, kvmclock.
DEVICES_BYTES = (
    3 * ctypes.sizeof(x86_uapi.kvm_irqchip)
    + ctypes.sizeof(x86_uapi.kvm_pit_state2)
    + ctypes.sizeof(x86_uapi.kvm_clock_data)
)


def _shape(record: bytes) -> tuple[Any, int, int]:
    """The blocks' layout, and where vCPU 0's CPUID table and block start."""
    _, _, flags, _, xsave_bytes, msr_count, _, _, _ = HEADER.unpack_from(record)
    cpuid_bytes = VCPU.unpack_from(record, HEADER.size)[2]
    cpuid_at = HEADER.size + VCPU.size
    return block_layout(bool(flags & FLAG_LAPIC), xsave_bytes, msr_count), cpuid_at, cpuid_at + cpuid_bytes


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("devices", [False, True])
def test_a_flat_state_restores_and_the_guest_carries_on(kvm: Kvm, vcpus: int, devices: bool) -> None:
    source, guest, before = _paused_source(kvm, vcpus, devices)
    with source, build_vm(kvm, vcpus, devices) as target:
        wire = save_flat(source, irqchip=devices, pit=devices)
        # The map form of the same paused VM, for the registers the flat form must carry alike.
        mapped = save_vm_state(source, irqchip=devices, pit=devices)
        target.ram[:] = source.ram
        report = restore_flat(target, wire)
        assert set(report.timings) == {"check", "vcpu_buffers", "vcpu_ioctls", "vm_ioctls", "total"}
        assert_same_state(mapped, save_vm_state(target, irqchip=devices, pit=devices))
        target.start()
        wait_guest(target, guest, lambda st: all(a.heartbeat > b.heartbeat for b, a in zip(before, st)))
        target.pause()
        assert_vcpus_healthy(target)
        assert_continued(before, guest.status(target.ram))
        assert guest.verify(target.ram).ok


def test_the_blocks_are_the_map_forms_parts_and_the_msrs_in_restore_order(kvm: Kvm) -> None:
    source, _, _ = _paused_source(kvm, 1, devices=True)
    with source:
        wire = save_flat(source, irqchip=True, pit=True)
        mapped = save_vm_state(source, irqchip=True, pit=True).vcpus[0]
    layout, cpuid_at, block_at = _shape(wire)
    block = wire[block_at : block_at + layout.size]
    assert len(block) == layout.size
    for name, value in (
        ("REGS", mapped.regs),
        ("SREGS", mapped.sregs),
        ("XSAVE", mapped.xsave),
        ("XCRS", mapped.xcrs),
        ("DEBUGREGS", mapped.debugregs),
        ("LAPIC", mapped.lapic),
    ):
        assert bytes(layout.part(block, name)) == value, name
    assert struct.unpack_from("<I", block, layout.offsets["MP_STATE"])[0] == mapped.mp_state
    indices = [index for index, _ in mapped.msrs]
    assert indices[0] == MSR_IA32_TSC  # fixed.py keeps the host's list in restore order
    at = layout.offsets["MSRS"] + MSRS_HEADER_BYTES
    assert [struct.unpack_from("<I", block, at + i * MSR_ENTRY_BYTES)[0] for i in range(len(indices))] == indices
    assert wire[cpuid_at:block_at] == b"".join(mapped.cpuid)
    # Nothing after the VM-wide parts: the irqchips, the PIT, kvmclock.
    assert len(wire) == block_at + layout.size + DEVICES_BYTES


def test_a_target_built_with_another_cpuid_takes_the_states(kvm: Kvm) -> None:
    """The table is checked entry by entry and set when the target was not built with it."""
    source, guest, before = _paused_source(kvm, 1, devices=False)
    with source, build_vm(kvm, 1, devices=False) as target:
        wire = save_flat(source, irqchip=False, pit=False)
        _, cpuid_at, block_at = _shape(wire)
        table = wire[cpuid_at:block_at]
        # Another table on the target before the restore: the source's with one entry less.
        from migrated.kvm.arch.x86_64 import cpuid_buffer_of
        from migrated.kvm.arch.x86_64.fixed import set_cpuid

        entries = cpuid_of(source.vcpus[0])
        assert entries is not None
        set_cpuid(target.vcpus[0], cpuid_buffer_of(entries[:-1]))
        assert not cpuid_table_is_set(target.vcpus[0], table)
        target.ram[:] = source.ram
        restore_flat(target, wire)
        assert cpuid_table_is_set(target.vcpus[0], table)
        target.start()
        wait_guest(target, guest, lambda st: all(a.heartbeat > b.heartbeat for b, a in zip(before, st)))
        target.pause()
        assert_continued(before, guest.status(target.ram))


MSR_KVM_ASYNC_PF_INT = 0x4B564D06


def _target_built_for(kvm: Kvm, source: Vm) -> Vm:
    """A VM built as a migration target is: with the source's CPUID table (VmConfig.cpuid)."""
    entries = cpuid_of(source.vcpus[0])
    assert entries is not None
    return create_vm(kvm, VmConfig(memory_bytes=MEMORY, vcpus=len(source.vcpus), cpuid=entries))


def test_a_target_leaves_out_the_msrs_kvm_refused_at_its_build(kvm: Kvm) -> None:
    """Without an in-kernel LAPIC, KVM refuses MSR_KVM_ASYNC_PF_INT even at its value 0
    (`kvm_pv_enable_async_pf_int`; KVM_GET_MSR_INDEX_LIST lists it since Linux 5.8). A target
    finds that at its build; its restore leaves the MSR out, and one KVM_SET_MSRS sets the rest."""
    msr_indices = host_facts(kvm).msr_indices
    assert MSR_KVM_ASYNC_PF_INT in msr_indices
    source, guest, before = _paused_source(kvm, 1, devices=False)
    with source, _target_built_for(kvm, source) as target, build_vm(kvm, 1, devices=False) as not_a_target:
        vcpu = target.vcpus[0]
        refused = dict(refused_msrs_of(vcpu))
        assert refused.get(MSR_KVM_ASYNC_PF_INT) == 0
        assert refused_msrs_of(not_a_target.vcpus[0]) == ()  # built without a given table: not probed
        wire = save_flat(source, irqchip=False, pit=False)
        mapped = save_vm_state(source, irqchip=False, pit=False)
        target.ram[:] = source.ram
        report = restore_flat(target, wire)
        assert (0, MSR_KVM_ASYNC_PF_INT) in report.msrs_kept
        layout, _, _ = _shape(wire)
        plan = restore_plan(vcpu, layout.lapic, max(layout.xsave_bytes, vm_xsave2_bytes(target)), layout.msr_count)
        assert plan.batch.result(plan.msrs_at) == len(msr_indices) - len(refused)  # all the rest, in one call
        assert_same_state(mapped, save_vm_state(target, irqchip=False, pit=False))
        target.start()
        wait_guest(target, guest, lambda st: all(a.heartbeat > b.heartbeat for b, a in zip(before, st)))
        target.pause()
        assert_continued(before, guest.status(target.ram))
        assert guest.verify(target.ram).ok


def test_a_probe_kvm_fails_leaves_nothing_known_and_the_build_stands(kvm: Kvm) -> None:
    """KVM_GET_MSRS of an MSR KVM does not know stops short: the probe records nothing, raises
    nothing, and the restore then meets any refusal as it comes."""
    with build_vm(kvm, 1, devices=False) as vm:
        read_build_refused_msrs(vm.vcpus[0], (0xDEADBEEF,))
        assert refused_msrs_of(vm.vcpus[0]) == ()


def test_a_refused_msr_saved_with_another_value_is_named(kvm: Kvm) -> None:
    """Left out only at the value it holds: another value goes to KVM, which refuses it, and the
    restore names the MSR."""
    source, _, _ = _paused_source(kvm, 1, devices=False)
    with source, _target_built_for(kvm, source) as target:
        wire = bytearray(save_flat(source, irqchip=False, pit=False))
        layout, _, block_at = _shape(bytes(wire))
        position = host_facts(kvm).msr_indices.index(MSR_KVM_ASYNC_PF_INT)
        value_at = block_at + layout.offsets["MSRS"] + MSRS_HEADER_BYTES + position * MSR_ENTRY_BYTES + 8
        struct.pack_into("<Q", wire, value_at, 0xEC)  # a vector, as a guest with a LAPIC sets it
        with pytest.raises(
            StateError, match=r"MSR 0x4b564d06 \(KVM_ASYNC_PF_INT\) = 0xec was refused \(it holds 0x0\)"
        ):
            restore_flat(target, bytes(wire))


@pytest.mark.parametrize("devices", [False, True])
def test_a_rehearsal_writes_nothing_and_the_restore_after_it_holds(
    kvm: Kvm, devices: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rehearsal (a target just before the source pauses) runs the restore's checks and
    copies on the target's own state: every ioctl it issues only reads (each batch's steps and
    each single call recorded), every register of the never-run target reads as before, and the
    real restore that follows puts the source's state in, the guest carrying on."""
    source, guest, before = _paused_source(kvm, 1, devices)
    target_vm = _target_built_for(kvm, source) if not devices else build_vm(kvm, 1, devices=True)
    with source, target_vm as target:
        fresh = save_vm_state(target, irqchip=devices, pit=devices)
        calls: list[str] = []
        run, ioctl = IoctlBatch.run, Vcpu.ioctl

        def recorded_run(batch: IoctlBatch, start: int = 0) -> int:
            calls.extend(batch._steps[start:])
            return run(batch, start)

        def recorded_ioctl(vcpu: Vcpu, name: str, *args: Any) -> Any:
            calls.append(name)
            return ioctl(vcpu, name, *args)

        monkeypatch.setattr(IoctlBatch, "run", recorded_run)
        monkeypatch.setattr(Vcpu, "ioctl", recorded_ioctl)
        assert rehearse_restore(target) > 0
        monkeypatch.undo()
        assert any("KVM_GET_REGS" in call for call in calls), calls  # the recording saw the save
        assert not [call for call in calls if "_SET_" in call], calls
        assert_same_state(fresh, save_vm_state(target, irqchip=devices, pit=devices))
        wire = save_flat(source, irqchip=devices, pit=devices)
        mapped = save_vm_state(source, irqchip=devices, pit=devices)
        target.ram[:] = source.ram
        restore_flat(target, wire)
        assert_same_state(mapped, save_vm_state(target, irqchip=devices, pit=devices))
        target.start()
        wait_guest(target, guest, lambda st: all(a.heartbeat > b.heartbeat for b, a in zip(before, st)))
        target.pause()
        assert_continued(before, guest.status(target.ram))


# ---- refused ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_wire() -> bytes:
    with Kvm.open() as kvm:
        source, _, _ = _paused_source(kvm, 1, devices=True)
        with source:
            return save_flat(source, irqchip=True, pit=True)


Mutation = Callable[[bytearray], bytearray]


def _header(**fields: Any) -> Mutation:
    names = ["magic", "version", "flags", "vcpus", "xsave_bytes", "msr_count", "signature", "zero", "vendor"]

    def mutate(record: bytearray) -> bytearray:
        values = dict(zip(names, HEADER.unpack_from(record)))
        values.update(fields)
        HEADER.pack_into(record, 0, *(values[name] for name in names))
        return record

    return mutate


def _in_block(change: Callable[[bytearray, Any, int], None]) -> Mutation:
    def mutate(record: bytearray) -> bytearray:
        layout, _, block_at = _shape(bytes(record))
        change(record, layout, block_at)
        return record

    return mutate


def _msr_index(position: int, index: int) -> Mutation:
    def change(record: bytearray, layout: Any, at: int) -> None:
        entry = at + layout.offsets["MSRS"] + MSRS_HEADER_BYTES + position * MSR_ENTRY_BYTES
        struct.pack_into("<I", record, entry, index)

    return _in_block(change)


def _swap_first_msrs(record: bytearray, layout: Any, at: int) -> None:
    at += layout.offsets["MSRS"] + MSRS_HEADER_BYTES
    first, second = bytes(record[at : at + 16]), bytes(record[at + 16 : at + 32])
    record[at : at + 32] = second + first


def _vcpu_header(field: int, value: int) -> Mutation:
    def mutate(record: bytearray) -> bytearray:
        struct.pack_into("<I", record, HEADER.size + 4 * field, value)
        return record

    return mutate


def _cpuid_twice(record: bytearray) -> bytearray:
    _, cpuid_at, _ = _shape(bytes(record))
    record[cpuid_at + 40 : cpuid_at + 80] = record[cpuid_at : cpuid_at + 40]
    return record


def _other_vendor(record: bytearray) -> bytearray:
    vendor = HEADER.unpack_from(record)[8]
    return _header(vendor=b"AuthenticAMD" if vendor == b"GenuineIntel" else b"GenuineIntel")(record)


def _first_chip_id(record: bytearray) -> bytearray:
    chips = len(record) - DEVICES_BYTES
    struct.pack_into("<I", record, chips, 2)
    return record


BAD: list[tuple[str, Mutation, type[Exception], str]] = [
    ("short", lambda r: r[:20], StateFormatError, "shorter than the header"),
    ("magic", _header(magic=b"XXXX"), StateFormatError, "magic b'XXXX'"),
    ("version", _header(version=99), StateFormatError, "version: 99"),
    ("flags", _header(flags=8), StateFormatError, "unknown bits"),
    ("header reserved", _header(zero=1), StateFormatError, "reserved bytes"),
    ("pit without irqchip", _header(flags=FLAG_PIT), StateFormatError, "needs the in-kernel irqchip"),
    ("no vcpus", _header(vcpus=0), StateFormatError, "vcpus: 0"),
    ("xsave not a multiple of 4", _header(xsave_bytes=4098), StateFormatError, "xsave_bytes: 4098"),
    ("xsave too large", _header(xsave_bytes=1 << 20), StateFormatError, "xsave_bytes"),
    ("msr count", _header(msr_count=5000), StateFormatError, "msr_count: 5000"),
    ("one byte more", lambda r: r + b"\0", StateFormatError, "the header and the vCPUs say"),
    ("one byte less", lambda r: r[:-1], StateFormatError, "the header and the vCPUs say"),
    ("cut in a vcpu", lambda r: r[:3000], StateFormatError, "inside this vCPU"),
    (
        "mp state",
        _in_block(lambda r, lay, at: struct.pack_into("<I", r, at + lay.offsets["MP_STATE"], 77)),
        StateFormatError,
        "MP state 77",
    ),
    (
        "msr list count",
        _in_block(lambda r, lay, at: struct.pack_into("<I", r, at + lay.offsets["MSRS"], 3)),
        StateFormatError,
        "MSR list says 3 entries",
    ),
    ("msr twice", _msr_index(1, MSR_IA32_TSC), StateFormatError, "an MSR appears twice"),
    ("tsc not first", _in_block(_swap_first_msrs), StateFormatError, "must come first"),
    ("unknown msr", _msr_index(2, 0xDEAD0000), IncompatibleStateError, "0xdead0000"),
    ("cpuid length", _vcpu_header(2, 41), StateFormatError, "cpuid: 41 bytes"),
    ("cpuid twice", _cpuid_twice, StateFormatError, "appears twice"),
    ("vcpu index", _vcpu_header(0, 3), StateFormatError, "vcpus[0].index: 3"),
    ("vcpu reserved", _vcpu_header(3, 1), StateFormatError, "reserved"),
    ("another cpu", _other_vendor, IncompatibleStateError, "same CPU vendor"),
    ("irqchip id", _first_chip_id, StateFormatError, "irqchip[0]: chip_id 2"),
]


@pytest.mark.parametrize("what, mutate, error, message", BAD, ids=[case[0] for case in BAD])
def test_a_bad_flat_state_is_refused_naming_it_before_any_write(
    kvm: Kvm, flat_wire: bytes, what: str, mutate: Mutation, error: type[Exception], message: str
) -> None:
    record = bytes(mutate(bytearray(flat_wire)))
    with build_vm(kvm, 1, devices=True) as target:
        regs_before = save_vm_state(target, irqchip=True, pit=True).vcpus[0].regs
        with pytest.raises(error) as caught:
            restore_flat(target, record)
        assert message in str(caught.value), (what, str(caught.value))
        assert save_vm_state(target, irqchip=True, pit=True).vcpus[0].regs == regs_before


def test_a_vcpu_count_other_than_the_targets_is_refused(kvm: Kvm, flat_wire: bytes) -> None:
    with build_vm(kvm, 2, devices=True) as target:
        with pytest.raises(IncompatibleStateError, match="the state has 1 vCPU"):
            restore_flat(target, flat_wire)


def test_the_zero_xsave_fault_zeroes_only_the_xsave_part(flat_wire: bytes) -> None:
    zeroed = zero_flat_xsave(flat_wire)
    layout, _, block_at = _shape(flat_wire)
    xsave = block_at + layout.offsets["XSAVE"]
    assert any(flat_wire[xsave : xsave + layout.xsave_bytes])
    assert not any(zeroed[xsave : xsave + layout.xsave_bytes])
    assert zeroed[:xsave] == flat_wire[:xsave]
    assert zeroed[xsave + layout.xsave_bytes :] == flat_wire[xsave + layout.xsave_bytes :]


def test_a_block_goes_into_a_larger_xsave_plan_part_by_part_zero_padded() -> None:
    """A source whose XSAVE area is smaller than the target's (KVM_SET_XSAVE reads the target's
    size): no host here has two sizes, so the copy itself is checked."""
    from migrated.kvm.arch.x86_64.flatstate import _copy_block

    small, large = block_layout(True, 4096, 3), block_layout(True, 8192, 3)
    block = bytes((i * 7 + 1) % 251 for i in range(small.size))
    into = (ctypes.c_uint8 * large.size)(*([0xEE] * large.size))
    _copy_block(block, small, into, large)
    got = bytes(into)
    for name in small.offsets:
        at = large.offsets[name]
        assert got[at : at + small.sizes[name]] == small.part(block, name), name
    xsave = large.offsets["XSAVE"]
    assert got[xsave + 4096 : xsave + 8192] == bytes(4096)
