"""The flat form of the x86 machine state (flatstate.py) on real KVM: saved from a running
workload guest, through msgpack, restored into a fresh VM that carries on; the same registers as
the map form; every malformed or incompatible flat state refused, naming the field, before any
vCPU is written.
"""

from __future__ import annotations

import copy
import ctypes
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from migrated.kvm.arch.x86_64 import MSR_IA32_TSC, save_vm_state
from migrated.kvm.arch.x86_64.fixed import cpuid_of, cpuid_table_is_set
from migrated.kvm.arch.x86_64.flatstate import restore_flat, save_flat, zero_flat_xsave
from migrated.kvm.arch.x86_64.statebuffers import MSR_ENTRY_BYTES, MSRS_HEADER_BYTES, block_layout
from migrated.kvm.saved_state import IncompatibleStateError, StateFormatError
from migrated.kvm.system import Kvm
from migrated.kvm.vm import Vm
from test_x86_state import (
    assert_continued,
    assert_same_state,
    assert_vcpus_healthy,
    build_vm,
    start_workload,
    wait_guest,
)

pytestmark = pytest.mark.kvm


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm.open() as handle:
        yield handle


def _paused_source(kvm: Kvm, vcpus: int, devices: bool) -> tuple[Vm, Any, list[Any]]:
    vm = build_vm(kvm, vcpus, devices)
    guest = start_workload(vm, vcpus, devices)
    wait_guest(vm, guest, lambda st: all(s.started and s.heartbeat > 0 and s.pages_written > 0 for s in st))
    vm.pause()
    assert_vcpus_healthy(vm)
    return vm, guest, guest.status(vm.ram)


def _through_msgpack(wire: dict[str, Any]) -> Any:
    return msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False, strict_map_key=True)


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("devices", [False, True])
def test_a_flat_state_restores_and_the_guest_carries_on(kvm: Kvm, vcpus: int, devices: bool) -> None:
    source, guest, before = _paused_source(kvm, vcpus, devices)
    with source, build_vm(kvm, vcpus, devices) as target:
        wire = save_flat(source, irqchip=devices, pit=devices)
        # The map form of the same paused VM, for the registers the flat form must carry alike.
        mapped = save_vm_state(source, irqchip=devices, pit=devices)
        target.ram[:] = source.ram
        report = restore_flat(target, _through_msgpack(wire))
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
    layout = block_layout(wire["lapic"], wire["xsave_bytes"], wire["msr_count"])
    block = wire["vcpus"][0]["block"]
    assert len(block) == layout.size
    for name, value in (
        ("REGS", mapped.regs),
        ("SREGS", mapped.sregs),
        ("XSAVE", mapped.xsave),
        ("XCRS", mapped.xcrs),
        ("DEBUGREGS", mapped.debugregs),
    ):
        assert bytes(layout.part(block, name)) == value, name
    assert struct.unpack_from("<I", block, layout.offsets["MP_STATE"])[0] == mapped.mp_state
    indices = [index for index, _ in mapped.msrs]
    assert indices[0] == MSR_IA32_TSC  # fixed.py keeps the host's list in restore order
    at = layout.offsets["MSRS"] + MSRS_HEADER_BYTES
    assert [struct.unpack_from("<I", block, at + i * MSR_ENTRY_BYTES)[0] for i in range(len(indices))] == indices
    assert wire["vcpus"][0]["cpuid"] == b"".join(mapped.cpuid)


def test_a_target_built_with_another_cpuid_takes_the_states(kvm: Kvm) -> None:
    """The table is checked entry by entry and set when the target was not built with it."""
    source, guest, before = _paused_source(kvm, 1, devices=False)
    with source, build_vm(kvm, 1, devices=False) as target:
        wire = save_flat(source, irqchip=False, pit=False)
        table = wire["vcpus"][0]["cpuid"]
        # Another table on the target before the restore: the source's with one entry less.
        from migrated.kvm.arch.x86_64 import cpuid_buffer_of
        from migrated.kvm.arch.x86_64.fixed import set_cpuid

        entries = cpuid_of(source.vcpus[0])
        assert entries is not None
        set_cpuid(target.vcpus[0], cpuid_buffer_of(entries[:-1]))
        assert not cpuid_table_is_set(target.vcpus[0], table)
        target.ram[:] = source.ram
        restore_flat(target, _through_msgpack(wire))
        assert cpuid_table_is_set(target.vcpus[0], table)
        target.start()
        wait_guest(target, guest, lambda st: all(a.heartbeat > b.heartbeat for b, a in zip(before, st)))
        target.pause()
        assert_continued(before, guest.status(target.ram))


# ---- refused ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_wire() -> Any:
    with Kvm.open() as kvm:
        source, _, _ = _paused_source(kvm, 1, devices=True)
        with source:
            return _through_msgpack(save_flat(source, irqchip=True, pit=True))


Mutation = Callable[[dict[str, Any]], None]


def _block(change: Callable[[bytearray, Any], None]) -> Mutation:
    def mutate(wire: dict[str, Any]) -> None:
        layout = block_layout(wire["lapic"], wire["xsave_bytes"], wire["msr_count"])
        block = bytearray(wire["vcpus"][0]["block"])
        change(block, layout)
        wire["vcpus"][0]["block"] = bytes(block)

    return mutate


def _msr_index(position: int, index: int) -> Mutation:
    def change(block: bytearray, layout: Any) -> None:
        struct.pack_into("<I", block, layout.offsets["MSRS"] + MSRS_HEADER_BYTES + position * MSR_ENTRY_BYTES, index)

    return _block(change)


def _swap_first_msrs(block: bytearray, layout: Any) -> None:
    at = layout.offsets["MSRS"] + MSRS_HEADER_BYTES
    first, second = bytes(block[at : at + 16]), bytes(block[at + 16 : at + 32])
    block[at : at + 32] = second + first


def _other_vendor(vendor: bytes) -> bytes:
    return b"AuthenticAMD" if vendor == b"GenuineIntel" else b"GenuineIntel"


BAD: list[tuple[str, Mutation, type[Exception], str]] = [
    ("version", lambda w: w.update(version=99), StateFormatError, "version 99 is newer"),
    ("unknown key", lambda w: w.update(extra=1), StateFormatError, "unknown key(s) extra"),
    ("missing key", lambda w: w.pop("msr_count"), StateFormatError, "missing key(s) msr_count"),
    ("vendor", lambda w: w.update(cpu_vendor=b"x"), StateFormatError, "cpu_vendor: 1 bytes"),
    ("lapic type", lambda w: w.update(lapic=1), StateFormatError, "lapic: expected true or false"),
    ("lapic vs irqchip", lambda w: w.update(irqchip=[], pit2=b""), StateFormatError, "lapic"),
    ("xsave not a multiple of 4", lambda w: w.update(xsave_bytes=4098), StateFormatError, "xsave_bytes: 4098"),
    ("xsave too large", lambda w: w.update(xsave_bytes=1 << 20), StateFormatError, "xsave_bytes"),
    ("msr count", lambda w: w.update(msr_count=5000), StateFormatError, "msr_count"),
    (
        "block size",
        lambda w: w["vcpus"][0].update(block=w["vcpus"][0]["block"][:-8]),
        StateFormatError,
        "bytes, expected",
    ),
    (
        "mp state",
        _block(lambda b, lay: struct.pack_into("<I", b, lay.offsets["MP_STATE"], 77)),
        StateFormatError,
        "MP state 77",
    ),
    (
        "msr list count",
        _block(lambda b, lay: struct.pack_into("<I", b, lay.offsets["MSRS"], 3)),
        StateFormatError,
        "MSR list says 3 entries",
    ),
    ("msr twice", _msr_index(1, MSR_IA32_TSC), StateFormatError, "an MSR appears twice"),
    ("tsc not first", _block(_swap_first_msrs), StateFormatError, "must come first"),
    ("unknown msr", _msr_index(2, 0xDEAD0000), IncompatibleStateError, "0xdead0000"),
    ("cpuid length", lambda w: w["vcpus"][0].update(cpuid=b"\0" * 41), StateFormatError, "cpuid: 41 bytes"),
    (
        "cpuid twice",
        lambda w: w["vcpus"][0].update(cpuid=w["vcpus"][0]["cpuid"][:40] * 2),
        StateFormatError,
        "appears twice",
    ),
    ("vcpu index", lambda w: w["vcpus"][0].update(index=3), StateFormatError, "vcpus[0].index"),
    ("vcpu count", lambda w: w["vcpus"].append(copy.deepcopy(w["vcpus"][0])), StateFormatError, "index"),
    (
        "another cpu",
        lambda w: w.update(cpu_vendor=_other_vendor(w["cpu_vendor"])),
        IncompatibleStateError,
        "same CPU vendor",
    ),
    ("irqchip id", lambda w: w["irqchip"].reverse(), StateFormatError, "chip_id"),
]


@pytest.mark.parametrize("what, mutate, error, message", BAD, ids=[case[0] for case in BAD])
def test_a_bad_flat_state_is_refused_naming_it_before_any_write(
    kvm: Kvm, flat_wire: Any, what: str, mutate: Mutation, error: type[Exception], message: str
) -> None:
    wire = copy.deepcopy(flat_wire)
    mutate(wire)
    with build_vm(kvm, 1, devices=True) as target:
        regs_before = save_vm_state(target, irqchip=True, pit=True).vcpus[0].regs
        with pytest.raises(error) as caught:
            restore_flat(target, wire)
        assert message in str(caught.value), (what, str(caught.value))
        assert save_vm_state(target, irqchip=True, pit=True).vcpus[0].regs == regs_before


def test_a_vcpu_count_other_than_the_targets_is_refused(kvm: Kvm, flat_wire: Any) -> None:
    with build_vm(kvm, 2, devices=True) as target:
        with pytest.raises(IncompatibleStateError, match="the state has 1 vCPU"):
            restore_flat(target, flat_wire)


def test_the_zero_xsave_fault_zeroes_only_the_xsave_part(flat_wire: Any) -> None:
    wire = copy.deepcopy(flat_wire)
    zero_flat_xsave(wire)
    layout = block_layout(wire["lapic"], wire["xsave_bytes"], wire["msr_count"])
    old, new = flat_wire["vcpus"][0]["block"], wire["vcpus"][0]["block"]
    assert any(layout.part(old, "XSAVE")) and not any(layout.part(new, "XSAVE"))
    for name in layout.offsets:
        if name != "XSAVE":
            assert layout.part(new, name) == layout.part(old, name), name


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
