"""x86 state on real KVM: save from a running workload guest, restore into a fresh VM, go on there.

The round trips copy RAM and state from one VM into a second one built the same way, then show
the guest carries on from where it was (heartbeats and pages written keep rising, no verification
errors, the working set checks out) and that the clocks did not go back. The wire tests check
that `X86MachineState.from_wire` refuses every malformed input with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from migrated.guests.x86_64.boot import load_workload
from migrated.guests.workload import VcpuStatus, WorkloadGuest, WorkloadParams
from migrated.kvm import uapi
from migrated.kvm._libc import ioctl
from migrated.kvm.memory import GuestMemory
from migrated.kvm.system import Kvm
from migrated.kvm.vcpu import VcpuRunState, ensure_kick_handler
from migrated.kvm.arch import create_empty, create_vm, host_arch
from migrated.kvm.arch.x86_64.fixed import cpuid_is_set
from migrated.kvm.vm import DEFAULT_RING_BYTES, Vm, VmConfig
from migrated.kvm.errors import KvmIoctlError
from migrated.kvm.saved_state import STATE_VERSION, IncompatibleStateError, StateError, StateFormatError
from migrated.kvm.arch.x86_64 import uapi as x86_uapi
from migrated.kvm.arch.x86_64 import (
    MAX_CPUID_ENTRIES,
    MAX_MSRS,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    X86MachineState,
    check_compatible,
    cpuid_buffer_of,
    cpuid_of,
    create_irqchip,
    create_pit2,
    detect_devices,
    get_cpuid,
    get_cpuid_bytes,
    get_msrs,
    restore_msr_order,
    restore_vcpu_state,
    restore_vm_state,
    save_vcpu_state,
    save_vm_state,
    set_msrs,
)

pytestmark = pytest.mark.kvm

MIB = 1 << 20
MEMORY = 64 * MIB
WAIT_S = 30.0  # a deadline for guest progress, generous for a loaded host


def build_vm(kvm: Kvm, vcpus: int, devices: bool) -> Vm:
    """A VM like `Vm.create` makes; with `devices`, an in-kernel irqchip and PIT before vCPUs."""
    if not devices:
        return create_vm(kvm, VmConfig(memory_bytes=MEMORY, vcpus=vcpus))
    caps = kvm.caps()
    ensure_kick_handler()
    vm = Vm(kvm, caps, host_arch())
    try:
        if caps.dirty_ring_max_bytes:
            vm.enable_dirty_ring(min(DEFAULT_RING_BYTES, caps.dirty_ring_max_bytes))
        vm.add_memory(GuestMemory.flat(MEMORY, name="vm-ram"))
        create_irqchip(vm)
        create_pit2(vm)
        for index in range(vcpus):
            vm.create_vcpu(index)
        vm.finish_setup()
    except BaseException:
        vm.close()
        raise
    return vm


def start_workload(vm: Vm, vcpus: int, devices: bool) -> WorkloadGuest:
    guest = load_workload(vm, WorkloadParams(vcpus=vcpus, working_set_bytes=16 * MIB))
    if devices:
        # With the in-kernel irqchip the APs wait for INIT/SIPI; this guest starts them directly.
        for vcpu in vm.vcpus[1:]:
            vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
    vm.start()
    return guest


def assert_vcpus_healthy(vm: Vm) -> None:
    assert [v.error for v in vm.vcpus] == [None] * len(vm.vcpus)
    assert vm.harvester_error is None


def get_clock(vm: Vm) -> int:
    clock = x86_uapi.kvm_clock_data()
    ioctl(vm.fd, x86_uapi.KVM_GET_CLOCK, clock)
    return int(clock.clock)


def pit_without_load_times(pit2: bytes) -> list[tuple[Any, ...]]:
    """The PIT's channels, minus `count_load_time`: KVM_SET_PIT2 reloads each channel's count
    at the host's current ktime, so that field is the restore's instant, not the saved one."""
    state = x86_uapi.kvm_pit_state2.from_buffer_copy(pit2)
    channels = [tuple(getattr(c, name) for name, *_ in c._fields_ if name != "count_load_time") for c in state.channels]
    return [*channels, (state.flags,)]


def migrate_in_process(vcpus: int, devices: bool, kvm: Kvm) -> None:
    with build_vm(kvm, vcpus, devices) as source, build_vm(kvm, vcpus, devices) as target:
        guest = start_workload(source, vcpus, devices)
        wait_guest(source, guest, lambda st: all(s.started and s.heartbeat > 0 and s.pages_written > 0 for s in st))
        source.pause()
        assert_vcpus_healthy(source)
        before = guest.status(source.ram)
        assert all(s.started and s.heartbeat > 0 and s.pages_written > 0 for s in before), before
        assert all(s.verify_errors == 0 for s in before), before

        state = save_vm_state(source, irqchip=devices, pit=devices)
        assert state.has_irqchip is devices and state.has_pit is devices
        assert len(state.vcpus) == vcpus
        print(f"\nsave, {vcpus} vCPU(s), devices={devices}: {_ms(state.timings)}")

        target.ram[:] = source.ram
        report = restore_vm_state(target, state, irqchip=devices, pit=devices)
        print(f"restore, {vcpus} vCPU(s), devices={devices}: {_ms(report.timings)}")
        print(f"MSRs KVM would not rewrite but already held: {report.msrs_kept}")
        assert report.clock_advanced is False

        # TSC continuity: not reset to ~0 on the new VM, not behind the saved value.
        for vcpu, saved in zip(target.vcpus, state.vcpus):
            ((_, tsc_now),) = get_msrs(vcpu, [MSR_IA32_TSC])
            tsc_saved = saved.msr(MSR_IA32_TSC)
            assert tsc_saved is not None and tsc_saved > 0
            assert tsc_now >= tsc_saved, (vcpu.index, tsc_now, tsc_saved)
        # kvmclock continues from the saved value (frozen across the downtime by default).
        clock_saved = state.clock_struct().clock
        clock_now = get_clock(target)
        assert clock_saved <= clock_now < clock_saved + 5 * 10**9

        # Save again from the target, before it ran: the state read back is what was written.
        again = save_vm_state(target, irqchip=devices, pit=devices)
        assert_same_state(state, again)

        target.start()
        wait_guest(
            target,
            guest,
            lambda st: all(a.heartbeat > b.heartbeat and a.pages_written > b.pages_written for b, a in zip(before, st)),
        )
        target.pause()
        assert_vcpus_healthy(target)
        after = guest.status(target.ram)
        assert_continued(before, after)
        report_verify = guest.verify(target.ram)
        assert report_verify.ok, report_verify


def assert_same_state(saved: X86MachineState, again: X86MachineState) -> None:
    assert (again.cpu_vendor, again.cpu_signature) == (saved.cpu_vendor, saved.cpu_signature)
    for a, b in zip(saved.vcpus, again.vcpus):
        where = f"vCPU {a.index}"
        assert b.cpuid == a.cpuid, where
        assert b.mp_state == a.mp_state, where
        assert b.regs == a.regs, where
        assert b.sregs == a.sregs, where
        assert b.xsave == a.xsave, where
        assert b.xcrs == a.xcrs, where
        assert b.debugregs == a.debugregs, where
        assert b.lapic == a.lapic, where
        assert b.events == a.events, where
        assert b.tsc_khz == a.tsc_khz, where
        # The TSC runs on while the target waits; every other MSR reads back as written.
        moving = {MSR_IA32_TSC}
        assert [m for m in b.msrs if m[0] not in moving] == [m for m in a.msrs if m[0] not in moving], where
    # VM-wide parts: PIC master, PIC slave and IOAPIC byte for byte; the PIT but for its
    # reload instants.
    assert again.irqchip == saved.irqchip
    if saved.pit2:
        assert pit_without_load_times(again.pit2) == pit_without_load_times(saved.pit2)


def wait_guest(vm: Vm, guest: WorkloadGuest, condition: Callable[[list[VcpuStatus]], bool]) -> None:
    """Until the guest's own status words say `condition` (a deadline, not a fixed run time)."""
    deadline = time.monotonic() + WAIT_S
    while not condition(guest.status(vm.ram)):
        errors = [v.error for v in vm.vcpus if v.error is not None]
        assert not errors, errors
        assert time.monotonic() < deadline, f"timed out; guest status: {guest.status(vm.ram)}"
        time.sleep(0.005)


def assert_continued(before: list[VcpuStatus], after: list[VcpuStatus]) -> None:
    for b, a in zip(before, after):
        assert a.started, a
        assert a.heartbeat > b.heartbeat, (b, a)
        assert a.pages_written > b.pages_written, (b, a)
        assert a.passes_done >= b.passes_done, (b, a)
        assert a.verify_errors == 0, a


def _ms(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in sorted(timings.items()))


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [1, 2])
def test_round_trip_continues_on_the_new_vm(kvm: Kvm, vcpus: int) -> None:
    migrate_in_process(vcpus, devices=False, kvm=kvm)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_round_trip_with_irqchip_and_pit(kvm: Kvm, vcpus: int) -> None:
    migrate_in_process(vcpus, devices=True, kvm=kvm)


def test_devices_are_detected_and_flags_checked(kvm: Kvm) -> None:
    with build_vm(kvm, 1, devices=False) as plain, build_vm(kvm, 1, devices=True) as full:
        assert detect_devices(plain) == (False, False)
        assert detect_devices(full) == (True, True)
        with pytest.raises(StateError, match="irqchip=True, but the VM has no in-kernel irqchip"):
            save_vm_state(plain, irqchip=True, pit=False)
        with pytest.raises(StateError, match="irqchip=False, but the VM has an in-kernel irqchip"):
            save_vm_state(full, irqchip=False, pit=False)
        state = save_vm_state(plain, irqchip=False, pit=False)
        with pytest.raises(IncompatibleStateError, match="source VM had no in-kernel irqchip"):
            restore_vm_state(full, state, irqchip=True, pit=True)


def test_irqchip_after_a_vcpu_is_refused_before_the_kernel_sees_it(kvm: Kvm) -> None:
    with Vm(kvm, kvm.caps(), host_arch()) as vm:
        vm.create_vcpu(0)
        with pytest.raises(StateError, match="KVM_CREATE_IRQCHIP must come before any vCPU"):
            create_irqchip(vm)
        assert detect_devices(vm) == (False, False)


def test_devices_added_after_a_detection_are_seen(kvm: Kvm) -> None:
    """detect_devices asks KVM once per VM; creating a device makes it ask again."""
    with Vm(kvm, kvm.caps(), host_arch()) as vm:
        assert detect_devices(vm) == (False, False)
        create_irqchip(vm)
        assert detect_devices(vm) == (True, False)
        create_pit2(vm)
        assert detect_devices(vm) == (True, True)


def test_running_vcpus_are_refused(kvm: Kvm) -> None:
    with build_vm(kvm, 1, devices=False) as vm:
        start_workload(vm, 1, devices=False)
        try:
            with pytest.raises(StateError, match="vCPU 0 is running: pause the VM"):
                save_vm_state(vm, irqchip=False, pit=False)
        finally:
            vm.pause()


def test_a_vcpu_started_but_not_yet_in_kvm_run_is_refused(kvm: Kvm) -> None:
    """The guard does not wait for the thread to say RUNNING: being started is enough. (Checking
    the state alone lost that race under a CPU hog: the save ran before the thread got going.)
    The vCPU's lock, held here (it is reentrant), keeps its thread from getting there."""
    with build_vm(kvm, 1, devices=False) as vm:
        load_workload(vm, WorkloadParams(vcpus=1, working_set_bytes=16 * MIB))
        vcpu = vm.vcpus[0]
        try:
            with vcpu._cond:
                vcpu.start()
                assert vcpu.state is VcpuRunState.CREATED
                with pytest.raises(StateError, match="vCPU 0 is running: pause the VM"):
                    save_vm_state(vm, irqchip=False, pit=False)
        finally:
            vm.pause()


def test_restore_into_a_vcpu_that_ran_with_another_cpuid_is_refused(kvm: Kvm) -> None:
    """Order matters across VMs: KVM takes the source's CPUID only before the first KVM_RUN."""
    with build_vm(kvm, 1, devices=False) as vm:
        start_workload(vm, 1, devices=False)
        time.sleep(0.05)
        vm.pause()
        saved = save_vcpu_state(vm.vcpus[0], kvm)
        entries = saved.cpuid_entries()
        for entry in entries:
            if entry.function == 0x40000001:  # KVM feature leaf: one bit off
                entry.eax ^= 1
        other = dataclasses.replace(saved, cpuid=tuple(bytes(e) for e in entries))
        with pytest.raises(StateError, match="restore into vCPUs that never ran"):
            restore_vcpu_state(vm.vcpus[0], other)
        # The same CPUID is accepted, and the guest's own state goes back in.
        restore_vcpu_state(vm.vcpus[0], saved)


def test_msr_failures_name_the_first_refused_msr(kvm: Kvm) -> None:
    with build_vm(kvm, 1, devices=False) as vm:
        vcpu = vm.vcpus[0]
        with pytest.raises(StateError, match=r"read 1 of 2 MSRs: MSR 0x12345678 could not be read"):
            get_msrs(vcpu, [MSR_IA32_TSC, 0x12345678])
        ((_, efer),) = get_msrs(vcpu, [0xC0000080])
        bad_efer = efer | 1 << 63  # a reserved bit
        with pytest.raises(
            StateError,
            match=rf"set 1 of 3 MSRs: MSR 0xc0000080 \(EFER\) = {bad_efer:#x} was refused "
            rf"\(it holds {efer:#x}\)",
        ):
            set_msrs(vcpu, [(0x174, 5), (0xC0000080, bad_efer), (0x175, 1)])
        with pytest.raises(
            StateError,
            match=r"set 0 of 1 MSRs: MSR 0x12345678 = 0x1 was refused \(it holds unreadable\)",
        ):
            set_msrs(vcpu, [(0x12345678, 1)])


def test_clock_is_frozen_by_default_and_advanced_by_realtime_on_request(kvm: Kvm, saved_state: X86MachineState) -> None:
    """KVM_SET_CLOCK gets KVM_CLOCK_REALTIME only when asked for and the saved clock has it."""
    clock = saved_state.clock_struct()
    clock.flags |= x86_uapi.KVM_CLOCK_REALTIME | x86_uapi.KVM_CLOCK_HOST_TSC
    clock.realtime = time.time_ns() - 2 * 10**9  # "saved two seconds ago"
    state = dataclasses.replace(saved_state, clock=bytes(clock))
    for advance in (False, True):
        with build_vm(kvm, 2, devices=True) as target:
            report = restore_vm_state(target, state, irqchip=True, pit=True, advance_clock=advance)
            now = get_clock(target)
            offered = kvm.check_extension(x86_uapi.KVM_CAP_ADJUST_CLOCK) & x86_uapi.KVM_CLOCK_REALTIME
            if advance and offered:
                assert report.clock_advanced
                assert now >= clock.clock + 2 * 10**9
            else:
                assert not report.clock_advanced
                assert clock.clock <= now < clock.clock + 10**9


def test_msr_restore_order_puts_tsc_first_and_deadline_last() -> None:
    msrs = [(0x174, 1), (MSR_IA32_TSC_DEADLINE, 2), (0x277, 3), (MSR_IA32_TSC, 4), (0x3B, 5)]
    assert restore_msr_order(msrs) == [
        (MSR_IA32_TSC, 4),
        (0x174, 1),
        (0x277, 3),
        (0x3B, 5),
        (MSR_IA32_TSC_DEADLINE, 2),
    ]


# ---- compatibility -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_state() -> X86MachineState:
    """A real state of a 2-vCPU VM with irqchip and PIT that ran the workload briefly."""
    with Kvm.open() as kvm, build_vm(kvm, 2, devices=True) as vm:
        start_workload(vm, 2, devices=True)
        time.sleep(0.05)
        vm.pause()
        return save_vm_state(vm, irqchip=True, pit=True)


def test_same_host_is_compatible(kvm: Kvm, saved_state: X86MachineState) -> None:
    check_compatible(saved_state, kvm)


def test_another_cpu_model_is_refused(kvm: Kvm, saved_state: X86MachineState) -> None:
    other_vendor = b"GenuineIntel" if saved_state.cpu_vendor != b"GenuineIntel" else b"AuthenticAMD"
    with pytest.raises(IncompatibleStateError, match=f"saved on {other_vendor.decode()}.*same CPU"):
        check_compatible(dataclasses.replace(saved_state, cpu_vendor=other_vendor), kvm)
    other_model = saved_state.cpu_signature ^ 0x10  # base model + 1
    with pytest.raises(IncompatibleStateError, match="model"):
        check_compatible(dataclasses.replace(saved_state, cpu_signature=other_model), kvm)
    # Another stepping of the same model is fine.
    other_stepping = saved_state.cpu_signature ^ 1
    check_compatible(dataclasses.replace(saved_state, cpu_signature=other_stepping), kvm)


def test_unknown_msr_is_refused(kvm: Kvm, saved_state: X86MachineState) -> None:
    vcpu = saved_state.vcpus[0]
    odd = dataclasses.replace(vcpu, msrs=(*vcpu.msrs, (0x12345678, 0)))
    state = dataclasses.replace(saved_state, vcpus=(odd, *saved_state.vcpus[1:]))
    with pytest.raises(IncompatibleStateError, match="unknown to this host.s KVM: MSR 0x12345678$"):
        check_compatible(state, kvm)


# ---- wire format ---------------------------------------------------------------------------


def wire(state: X86MachineState) -> dict[str, Any]:
    """The state as a peer would receive it: through msgpack."""
    packed = msgpack.packb(state.to_wire(), use_bin_type=True)
    result: dict[str, Any] = msgpack.unpackb(packed, raw=False)
    return result


def test_wire_round_trip_through_msgpack(saved_state: X86MachineState) -> None:
    d = wire(saved_state)
    assert d["version"] == STATE_VERSION
    assert X86MachineState.from_wire(d) == saved_state
    v0 = saved_state.vcpus[0]
    assert len(v0.xsave) >= 4096 and len(v0.lapic) == 1024 and len(saved_state.irqchip) == 3
    assert v0.msr(MSR_IA32_TSC)


Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target: Any = d
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[int(last) if last.isdigit() else last] = value(target[last]) if callable(value) else value

    return mutate


_DELETE = object()

BAD_WIRE: list[tuple[str, Mutation, str]] = [
    (
        "newer version",
        _set("version", STATE_VERSION + 1),
        r"version 2 is newer than this migrated understands \(up to 1\); upgrade migrated",
    ),
    ("version 0", _set("version", 0), r"version 0 is invalid"),
    ("missing version", _set("version", _DELETE), r"missing key 'version'"),
    ("missing key", _set("clock", _DELETE), r"top level: missing key\(s\) clock"),
    ("unknown key", _set("extra", 1), r"top level: unknown key\(s\) extra"),
    ("missing vcpu key", _set("vcpus/1/events", _DELETE), r"vcpus\[1\]: missing key\(s\) events"),
    ("unknown vcpu key", _set("vcpus/0/fpu", b""), r"vcpus\[0\]: unknown key\(s\) fpu"),
    (
        "short regs",
        _set("vcpus/1/regs", lambda b: b[:-1]),
        r"vcpus\[1\]\.regs: 143 bytes, expected 144 \(struct kvm_regs\)",
    ),
    (
        "long sregs",
        _set("vcpus/0/sregs", lambda b: b + b"\0"),
        r"vcpus\[0\]\.sregs: 313 bytes, expected 312 \(struct kvm_sregs\)",
    ),
    ("regs not bytes", _set("vcpus/0/regs", "x" * 144), r"vcpus\[0\]\.regs: expected bytes, got str"),
    ("short clock", _set("clock", b"\0" * 40), r"clock: 40 bytes, expected 48 \(struct kvm_clock_data\)"),
    ("short events", _set("vcpus/0/events", b"\0" * 63), r"vcpus\[0\]\.events: 63 bytes, expected 64"),
    (
        "too many MSRs",
        _set("vcpus/0/msrs", [[0x10 + i, 0] for i in range(MAX_MSRS + 1)]),
        r"vcpus\[0\]\.msrs: 1025 entries, at most 1024 allowed",
    ),
    ("MSR not a pair", _set("vcpus/0/msrs", [[0x10]]), r"vcpus\[0\]\.msrs\[0\]: expected \[index, value\]"),
    (
        "MSR value too big",
        _set("vcpus/0/msrs", [[0x10, 1 << 64]]),
        r"vcpus\[0\]\.msrs\[0\]\[1\]: 18446744073709551616 is outside",
    ),
    (
        "MSR twice",
        _set("vcpus/0/msrs", [[0x10, 1], [0x10, 2]]),
        r"vcpus\[0\]\.msrs\[1\]: MSR 0x10 \(IA32_TSC\) appears twice",
    ),
    (
        "too many CPUID entries",
        _set("vcpus/0/cpuid", [b"\0" * 40] * (MAX_CPUID_ENTRIES + 1)),
        r"vcpus\[0\]\.cpuid: 257 entries, at most 256 allowed",
    ),
    (
        "CPUID entry short",
        _set("vcpus/0/cpuid", [b"\0" * 39]),
        r"vcpus\[0\]\.cpuid\[0\]: 39 bytes, expected 40 \(struct kvm_cpuid_entry2\)",
    ),
    ("CPUID empty", _set("vcpus/0/cpuid", []), r"vcpus\[0\]\.cpuid: no entries"),
    (
        "CPUID entry not bytes",
        _set("vcpus/0/cpuid", lambda entries: [*entries[:-1], "x" * 40]),
        r"vcpus\[0\]\.cpuid\[\d+\]: expected bytes, got str",
    ),
    (
        "CPUID leaf twice",
        _set("vcpus/1/cpuid", lambda entries: [entries[0], *entries]),
        r"vcpus\[1\]\.cpuid: the same \(function, index\) appears twice",
    ),
    (
        "MSR index a bool",
        _set("vcpus/0/msrs", [[True, 0]]),
        r"vcpus\[0\]\.msrs\[0\]\[0\]: expected an integer, got bool",
    ),
    ("MSR value negative", _set("vcpus/1/msrs", [[0x10, 5], [0x11, -1]]), r"vcpus\[1\]\.msrs\[1\]\[1\]: -1 is outside"),
    (
        "xsave too big",
        _set("vcpus/0/xsave", b"\0" * (64 * 1024 + 4)),
        r"vcpus\[0\]\.xsave: 65540 bytes: expected a multiple of 4 from 4096 to 65536",
    ),
    ("xsave too small", _set("vcpus/0/xsave", b"\0" * 1024), r"vcpus\[0\]\.xsave: 1024 bytes"),
    (
        "lapic wrong size",
        _set("vcpus/0/lapic", b"\0" * 1000),
        r"vcpus\[0\]\.lapic: 1000 bytes: expected 0 \(no in-kernel irqchip\) or 1024",
    ),
    ("lapic missing", _set("vcpus/1/lapic", b""), r"vcpus\[1\]\.lapic: missing, but the VM has in-kernel irqchip"),
    ("bool for int", _set("vcpus/0/mp_state", True), r"vcpus\[0\]\.mp_state: expected an integer, got bool"),
    ("unknown mp_state", _set("vcpus/0/mp_state", 5), r"vcpus\[0\]\.mp_state: 5 is not an x86"),
    ("index out of order", _set("vcpus/1/index", 0), r"vcpus\[1\]\.index: 0, expected 1"),
    ("no vcpus", _set("vcpus", []), r"vcpus: no vCPUs"),
    ("too many vcpus", _set("vcpus", [{}] * 4097), r"vcpus: 4097 entries, at most 4096"),
    ("vcpu not a map", _set("vcpus/0", [1, 2]), r"vcpus\[0\]: expected a map, got list"),
    ("two irqchips", _set("irqchip", lambda chips: chips[:2]), r"irqchip: 2 entries: expected 0 or 3"),
    (
        "irqchips swapped",
        _set("irqchip", lambda chips: [chips[1], chips[0], chips[2]]),
        r"irqchip\[0\]: chip_id 1, expected 0 \(PIC master\)",
    ),
    ("pit wrong size", _set("pit2", b"\0" * 100), r"pit2: 100 bytes: expected 0 \(no PIT\) or 112"),
    ("vendor wrong size", _set("cpu_vendor", b"AMD"), r"cpu_vendor: 3 bytes, expected 12"),
    ("signature negative", _set("cpu_signature", -1), r"cpu_signature: -1 is outside"),
]


@pytest.mark.parametrize(("mutate", "message"), [(m, msg) for _, m, msg in BAD_WIRE], ids=[n for n, _, _ in BAD_WIRE])
def test_malformed_wire_state_is_refused_naming_the_field(
    saved_state: X86MachineState, mutate: Mutation, message: str
) -> None:
    d = wire(saved_state)
    mutate(d)
    with pytest.raises(StateFormatError, match=message):
        X86MachineState.from_wire(d)


def test_wire_top_level_must_be_a_map() -> None:
    with pytest.raises(StateFormatError, match="expected a map, got list"):
        X86MachineState.from_wire([])
    with pytest.raises(StateFormatError, match="keys must be strings"):
        X86MachineState.from_wire({"version": 1, b"vcpus": []})


def test_state_format_error_is_a_value_error() -> None:
    assert issubclass(StateFormatError, ValueError)


def test_cpuid_and_msrs_go_to_kvm_and_back_as_written(kvm: Kvm) -> None:
    """The packed buffers (cpu.py: one pack or unpack per table, not ctypes field by field) carry
    what KVM reads and writes: a CPUID table set from raw entries reads back entry for entry,
    and MSRs written in one KVM_SET_MSRS read back with their values."""
    with build_vm(kvm, 1, devices=False) as vm:
        vcpu = vm.vcpus[0]
        entries = get_cpuid_bytes(vcpu)
        assert len(entries) > 2 and entries == tuple(bytes(e) for e in get_cpuid(vcpu))
        # A table without its last entry (the vCPU never ran: KVM takes another table).
        vcpu.set_cpuid(cpuid_buffer_of(entries[:-1]))
        again = get_cpuid_bytes(vcpu)
        assert len(again) == len(entries) - 1
        assert {e[:8] for e in again} == {e[:8] for e in entries[:-1]}, "(function, index) of every entry"
        with pytest.raises(ValueError, match="40 bytes each"):
            cpuid_buffer_of([entries[0][:-1]])
        sysenter = [(0x174, 0x10), (0x175, 0xFFFF_8000_0000_1000), (0x176, 0xFFFF_8000_0000_2000)]
        assert set_msrs(vcpu, sysenter) == []
        assert get_msrs(vcpu, [index for index, _ in sysenter]) == sysenter


# ---- the CPUID: read when it is set, not in the downtime (fixed.py) ------------------------


def _run_and_save(vm: Vm) -> tuple[WorkloadGuest, list[VcpuStatus], X86MachineState]:
    guest = start_workload(vm, 1, devices=False)
    wait_guest(vm, guest, lambda st: all(s.started and s.heartbeat > 0 and s.pages_written > 0 for s in st))
    vm.pause()
    assert_vcpus_healthy(vm)
    return guest, guest.status(vm.ram), save_vm_state(vm, irqchip=False, pit=False)


def _carries_on(target: Vm, guest: WorkloadGuest, before: list[VcpuStatus]) -> None:
    target.start()
    wait_guest(target, guest, lambda st: all(a.heartbeat > b.heartbeat for b, a in zip(before, st)))
    target.pause()
    assert_vcpus_healthy(target)
    assert_continued(before, guest.status(target.ram))


def test_the_saved_cpuid_is_the_table_read_back_when_it_was_set(kvm: Kvm) -> None:
    """A state carries what KVM_GET_CPUID2 read right after the build set the table (before the
    first KVM_RUN), not a read in the downtime; KVM takes it back into the vCPU after it ran
    (Linux 5.16+ accepts only the table it holds, modulo the bits it updates at run time)."""
    with build_vm(kvm, 1, devices=False) as vm:
        vcpu = vm.vcpus[0]
        read_at_build = cpuid_of(vcpu)
        assert read_at_build is not None and read_at_build == get_cpuid_bytes(vcpu)
        _, _, state = _run_and_save(vm)
        assert state.vcpus[0].cpuid == read_at_build
        restore_vcpu_state(vcpu, state.vcpus[0])  # a different table would be refused (EINVAL)


def test_a_target_built_with_the_sources_cpuid_restores_without_setting_it(kvm: Kvm) -> None:
    """The target's vCPUs get the source's table at the build (VmConfig.cpuid, from the VM
    description): the restore compares bytes and leaves the table, and the guest carries on."""
    with build_vm(kvm, 1, devices=False) as source:
        guest, before, state = _run_and_save(source)
        config = VmConfig(memory_bytes=MEMORY, vcpus=1, cpuid=state.vcpus[0].cpuid)
        with create_vm(kvm, config) as target:
            set_at_build = target.vcpus[0].cpuid_set
            assert set_at_build is not None
            target.ram[:] = source.ram
            restore_vm_state(target, state, irqchip=False, pit=False)
            assert target.vcpus[0].cpuid_set is set_at_build, "KVM_SET_CPUID2 ran again in the restore"
            assert get_cpuid_bytes(target.vcpus[0]) == state.vcpus[0].cpuid
            _carries_on(target, guest, before)


def test_a_target_built_with_another_cpuid_takes_the_states(kvm: Kvm) -> None:
    """A target built with another table (an older source sends none: the host's supported
    CPUID) gets the state's in the restore, as before, and the guest carries on."""
    with build_vm(kvm, 1, devices=False) as source, build_vm(kvm, 1, devices=False) as target:
        guest, before, state = _run_and_save(source)
        supported = cpuid_buffer_of([bytes(e) for e in kvm.supported_cpuid()])
        target.vcpus[0].set_cpuid(supported)
        assert target.vcpus[0].cpuid_set != bytes(cpuid_buffer_of(state.vcpus[0].cpuid))
        target.ram[:] = source.ram
        restore_vm_state(target, state, irqchip=False, pit=False)
        assert target.vcpus[0].cpuid_set == bytes(cpuid_buffer_of(state.vcpus[0].cpuid))
        assert get_cpuid_bytes(target.vcpus[0]) == state.vcpus[0].cpuid
        _carries_on(target, guest, before)


def test_a_cpuid_table_kvm_refuses_at_the_build_is_a_clear_error(kvm: Kvm) -> None:
    """A described table KVM will not take fails the build, naming the ioctl (the target
    refuses the VM then, and the source resumes it)."""
    # Leaf 0x80000008 with 255 linear-address bits: KVM allows 48 or 57 (or 0).
    bad = struct.pack("<7I12x", 0x8000_0008, 0, 0, 0xFF00 | 48, 0, 0, 0)
    config = VmConfig(memory_bytes=MEMORY, vcpus=1, cpuid=(bad,))
    with pytest.raises(KvmIoctlError, match=r"vCPU 0: KVM_SET_CPUID2 failed"):
        create_vm(kvm, config).close()


def test_a_table_set_by_the_restore_is_read_back_for_the_next_save(kvm: Kvm) -> None:
    """A restore that had to set the state's CPUID (an older source described none) reads the
    table back then: the VM's next save, and its next description, know it without asking KVM."""
    with build_vm(kvm, 1, devices=False) as source, build_vm(kvm, 1, devices=False) as target:
        _, _, state = _run_and_save(source)
        target.vcpus[0].set_cpuid(cpuid_buffer_of([bytes(e) for e in kvm.supported_cpuid()]))
        assert cpuid_of(target.vcpus[0]) is None  # set another way: not known
        target.ram[:] = source.ram
        restore_vm_state(target, state, irqchip=False, pit=False)
        assert cpuid_of(target.vcpus[0]) == state.vcpus[0].cpuid
        assert host_arch().vm_features(target)["vcpu_cpuid"] == list(state.vcpus[0].cpuid)


SHELL_TEST_CONFIG = VmConfig(memory_bytes=16 << 20, vcpus=2, dirty_tracking="ring", ring_bytes=1 << 16)


def test_a_vm_built_from_a_shell_gets_the_cpuid_of_its_description(kvm: Kvm) -> None:
    """The shell is made before any description: the table a target's description carries
    (VmConfig.cpuid) is set when the shell is completed, so the restore in the downtime finds it
    set. Seen missing once: the table was registered with the shell's devices and never set."""
    with create_vm(kvm, dataclasses.replace(SHELL_TEST_CONFIG, name="source", vcpus=1)) as source:
        table = cpuid_of(source.vcpus[0])
    assert table, "precondition: the source's table was read back at its build"
    # Another table than the host's: one entry fewer, so only the description can have set it.
    wanted = table[:-1]
    shell = create_empty(kvm, dataclasses.replace(SHELL_TEST_CONFIG, name="shell"))
    with create_vm(kvm, dataclasses.replace(SHELL_TEST_CONFIG, cpuid=wanted), shell=shell) as vm:
        assert vm is shell
        assert all(cpuid_is_set(vcpu, wanted) for vcpu in vm.vcpus)


def test_batched_save_and_restore_stop_at_the_msr_kvm_refused(kvm: Kvm) -> None:
    """The save and the restore run their ioctls in one batch (statebuffers.py); an MSR KVM cannot
    read or will not write still fails with the same errors as one-by-one calls, naming it."""
    with build_vm(kvm, 1, devices=False) as vm:
        vcpu = vm.vcpus[0]
        with pytest.raises(StateError, match=r"read 1 of 2 MSRs: MSR 0x12345678 could not be read"):
            save_vcpu_state(vcpu, kvm, msr_indices=[MSR_IA32_TSC, 0x12345678])
        saved = save_vcpu_state(vcpu, kvm)
        ((_, efer),) = get_msrs(vcpu, [0xC0000080])
        bad_efer = efer | 1 << 63  # a reserved bit
        bad = dataclasses.replace(saved, msrs=(*saved.msrs, (0xC0000080, bad_efer)))
        with pytest.raises(StateError, match=rf"MSR 0xc0000080 \(EFER\) = {bad_efer:#x} was refused"):
            restore_vcpu_state(vcpu, bad)
        # A good state after the failed one: the batch writes all of it, events included.
        regs = uapi.kvm_regs.from_buffer_copy(saved.regs)
        regs.rax = 0x1234_5678
        good = dataclasses.replace(saved, regs=bytes(regs))
        restore_vcpu_state(vcpu, good)
        assert save_vcpu_state(vcpu, kvm).regs == good.regs
