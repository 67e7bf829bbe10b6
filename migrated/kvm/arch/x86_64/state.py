"""Complete x86 machine state: saved from a paused VM, restored into a fresh one (DESIGN R9).

Per vCPU: CPUID (the vCPU's own table, KVM_GET_CPUID2), MP_STATE, REGS, SREGS, XSAVE (XSAVE2
sized), XCRS, DEBUGREGS, LAPIC (with an in-kernel irqchip), every MSR of KVM_GET_MSR_INDEX_LIST,
VCPU_EVENTS and the TSC frequency. Per VM: the in-kernel PIC master, PIC slave and IOAPIC
(KVM_GET_IRQCHIP), the PIT (KVM_GET_PIT2) where they exist, and kvmclock (KVM_GET_CLOCK).

Restore order, the one KVM accepts (R9; verified on this host, HOST-NOTES "What works"):

    per vCPU:  CPUID, MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS, VCPU_EVENTS
    VM-wide:   IRQCHIP (PIC master, PIC slave, IOAPIC), PIT2, CLOCK   -- after every vCPU

- CPUID first: KVM checks XCR0, CR4 bits and MSRs against the guest's CPUID. KVM accepts
  KVM_SET_CPUID2 again after a vCPU ran only with identical contents (Linux 5.16+), so the target
  vCPU must not have run; `Vm.create_vcpu` sets the supported CPUID, and replacing it before the
  first KVM_RUN is allowed.
- LAPIC after SREGS (which carries the APIC base) and before MSRS (TSC_DEADLINE needs the LAPIC's
  timer mode); among the MSRs, IA32_TSC goes first and IA32_TSC_DEADLINE last.
- VCPU_EVENTS after REGS: KVM_SET_REGS clears a pending exception.
- The VM-wide parts after the vCPUs, kvmclock last.

Threads: every call here needs the vCPUs parked (`Vm.pause()`) or not started. KVM would
serialize the ioctls with KVM_RUN, but a state read while the guest runs is torn, and a write
races with it; the functions refuse a vCPU whose thread is RUNNING.

Serialization: `X86MachineState.to_wire()` gives a msgpack-able dict (str keys; bytes, int and list
values; the raw struct bytes as KVM returned them); `X86MachineState.from_wire()` checks every key, type,
size and count before anything is built from it, and raises `StateFormatError` naming the field.

The MSR and CPUID accessors are in `cpu.py`, the in-kernel devices in `devices.py`.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ... import uapi
from ...saved_state import (
    IncompatibleStateError,
    RestoreReport,
    StateError,
    StateFormatError,
    StepTimes,
    WireReader,
)
from ...errors import KvmIoctlError
from ...system import Kvm
from ...vcpu import Vcpu
from ...vm import Vm
from .cpu import (
    MAX_CPUID_ENTRIES,
    CpuModel,
    cpuid_buffer_of,
    get_cpuid_bytes,
    finish_set_msrs,
    msr_entries,
    msr_name,
    msrs_read_short,
    restore_msr_order,
    read_tsc_khz,
    xsave2_size,
)
from .devices import check_devices
from .statebuffers import IRQCHIP_IDS, MIN_XSAVE_BYTES, restore_plan, save_plan, vm_devices_plan
from .fixed import HostFacts, cpuid_is_set, cpuid_of, host_facts, note_tsc_khz, set_cpuid, tsc_khz_of, vm_xsave2_bytes
from . import uapi as x86_uapi


# Bounds on what a peer may send (DESIGN section 6). KVM's own limits are smaller or equal.
MAX_VCPUS = 4096  # KVM_MAX_VCPUS on x86 with CONFIG_MAXSMP
MAX_MSRS = 1024  # KVM_GET_MSR_INDEX_LIST gives 40 here, a few hundred at most elsewhere
MAX_XSAVE_BYTES = 64 << 10  # AMX needs ~11 KiB; the largest XSAVE layouts stay far below


# x86 multiprocessing states KVM_GET_MP_STATE can report (api.rst 4.38).
X86_MP_STATES = frozenset(
    {
        uapi.KVM_MP_STATE_RUNNABLE,
        x86_uapi.KVM_MP_STATE_UNINITIALIZED,
        x86_uapi.KVM_MP_STATE_INIT_RECEIVED,
        x86_uapi.KVM_MP_STATE_HALTED,
        x86_uapi.KVM_MP_STATE_SIPI_RECEIVED,
        x86_uapi.KVM_MP_STATE_AP_RESET_HOLD,
    }
)

_SIZE = {
    "cpuid": ctypes.sizeof(uapi.kvm_cpuid_entry2),
    "regs": ctypes.sizeof(uapi.kvm_regs),
    "sregs": ctypes.sizeof(uapi.kvm_sregs),
    "xcrs": ctypes.sizeof(x86_uapi.kvm_xcrs),
    "debugregs": ctypes.sizeof(x86_uapi.kvm_debugregs),
    "lapic": ctypes.sizeof(x86_uapi.kvm_lapic_state),
    "events": ctypes.sizeof(x86_uapi.kvm_vcpu_events),
    "irqchip": ctypes.sizeof(x86_uapi.kvm_irqchip),
    "pit2": ctypes.sizeof(x86_uapi.kvm_pit_state2),
    "clock": ctypes.sizeof(x86_uapi.kvm_clock_data),
}
_STRUCT_NAME = {
    "cpuid": "struct kvm_cpuid_entry2",
    "regs": "struct kvm_regs",
    "sregs": "struct kvm_sregs",
    "xcrs": "struct kvm_xcrs",
    "debugregs": "struct kvm_debugregs",
    "lapic": "struct kvm_lapic_state",
    "events": "struct kvm_vcpu_events",
    "irqchip": "struct kvm_irqchip",
    "pit2": "struct kvm_pit_state2",
    "clock": "struct kvm_clock_data",
}
_FUNCTION_AND_INDEX = operator.itemgetter(slice(0, 8))  # of a struct kvm_cpuid_entry2's bytes
_MSR_INDEX = operator.itemgetter(0)  # of an (index, value) pair
_IRQCHIP_NAMES = ("PIC master", "PIC slave", "IOAPIC")


# Wire checks shared with the other architecture's state (migrated/kvm/wire.py).
_W = WireReader("x86 state")
_error, _mapping, _int_value, _int = _W.error, _W.mapping, _W.int_value, _W.int_field
_bytes_value, _bytes, _list = _W.bytes_value, _W.bytes_field, _W.list_field


# --------------------------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------------------------
_VCPU_KEYS = frozenset("index tsc_khz cpuid mp_state regs sregs xsave xcrs debugregs lapic msrs events".split())
_VM_KEYS = frozenset("version cpu_vendor cpu_signature vcpus irqchip pit2 clock".split())


@dataclass(frozen=True)
class X86VcpuState:
    """One vCPU's state: raw struct bytes as KVM returned them, and ints."""

    index: int
    tsc_khz: int  # KVM_GET_TSC_KHZ; 0 where the host's TSC is unstable (EIO)
    cpuid: tuple[bytes, ...]  # struct kvm_cpuid_entry2 each
    mp_state: int
    regs: bytes
    sregs: bytes
    xsave: bytes  # struct kvm_xsave, XSAVE2-sized (>= 4096 bytes)
    xcrs: bytes
    debugregs: bytes
    lapic: bytes  # b"" without an in-kernel irqchip
    msrs: tuple[tuple[int, int], ...]  # (index, value)
    events: bytes

    def msr(self, index: int) -> int | None:
        for i, value in self.msrs:
            if i == index:
                return value
        return None

    def regs_struct(self) -> uapi.kvm_regs:
        return uapi.kvm_regs.from_buffer_copy(self.regs)

    def sregs_struct(self) -> uapi.kvm_sregs:
        return uapi.kvm_sregs.from_buffer_copy(self.sregs)

    def events_struct(self) -> x86_uapi.kvm_vcpu_events:
        return x86_uapi.kvm_vcpu_events.from_buffer_copy(self.events)

    def cpuid_entries(self) -> list[uapi.kvm_cpuid_entry2]:
        return [uapi.kvm_cpuid_entry2.from_buffer_copy(e) for e in self.cpuid]

    def to_wire(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tsc_khz": self.tsc_khz,
            "cpuid": list(self.cpuid),
            "mp_state": self.mp_state,
            "regs": self.regs,
            "sregs": self.sregs,
            "xsave": self.xsave,
            "xcrs": self.xcrs,
            "debugregs": self.debugregs,
            "lapic": self.lapic,
            "msrs": [[index, value] for index, value in self.msrs],
            "events": self.events,
        }

    @classmethod
    def from_wire(cls, d: object, where: str = "vcpu") -> X86VcpuState:
        m = _mapping(d, where, _VCPU_KEYS)
        entries = cpuid_entries(m, where)
        pairs = _list(m, "msrs", where, MAX_MSRS)
        msrs = _msr_pairs(pairs)
        if msrs is None:
            msrs = _msr_pairs_checked(pairs, where)
        xsave = _bytes(m, "xsave", where)
        if not MIN_XSAVE_BYTES <= len(xsave) <= MAX_XSAVE_BYTES or len(xsave) % 4:
            raise _error(
                where,
                "xsave",
                f"{len(xsave)} bytes: expected a multiple of 4 from {MIN_XSAVE_BYTES} to "
                f"{MAX_XSAVE_BYTES} (struct kvm_xsave)",
            )
        lapic = _bytes(m, "lapic", where)
        if len(lapic) not in (0, _SIZE["lapic"]):
            raise _error(
                where,
                "lapic",
                f"{len(lapic)} bytes: expected 0 (no in-kernel irqchip) or {_SIZE['lapic']} (struct kvm_lapic_state)",
            )
        mp_state = _int(m, "mp_state", where, 0, (1 << 32) - 1)
        if mp_state not in X86_MP_STATES:
            raise _error(where, "mp_state", f"{mp_state} is not an x86 KVM_MP_STATE_* value")
        return cls(
            index=_int(m, "index", where, 0, MAX_VCPUS - 1),
            tsc_khz=_int(m, "tsc_khz", where, 0, (1 << 32) - 1),
            cpuid=entries,
            mp_state=mp_state,
            regs=_struct_bytes(m, "regs", where),
            sregs=_struct_bytes(m, "sregs", where),
            xsave=xsave,
            xcrs=_struct_bytes(m, "xcrs", where),
            debugregs=_struct_bytes(m, "debugregs", where),
            lapic=lapic,
            msrs=msrs,
            events=_struct_bytes(m, "events", where),
        )


@dataclass(frozen=True)
class X86MachineState:
    """The whole machine: every vCPU, the in-kernel devices (if any) and kvmclock."""

    cpu_vendor: bytes  # CPUID leaf 0 (EBX, EDX, ECX) of the supported CPUID: "AuthenticAMD"
    cpu_signature: int  # CPUID leaf 1 EAX: family, model, stepping
    vcpus: tuple[X86VcpuState, ...]
    irqchip: tuple[bytes, ...]  # struct kvm_irqchip for PIC master, PIC slave, IOAPIC; or ()
    pit2: bytes  # struct kvm_pit_state2; b"" without an in-kernel PIT
    clock: bytes  # struct kvm_clock_data
    # Seconds per step of the save that made this state; not part of the state or the wire.
    timings: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_irqchip(self) -> bool:
        return bool(self.irqchip)

    @property
    def has_pit(self) -> bool:
        return bool(self.pit2)

    @property
    def cpu_model(self) -> CpuModel:
        return CpuModel.from_cpuid(self.cpu_vendor, self.cpu_signature)

    def clock_struct(self) -> x86_uapi.kvm_clock_data:
        return x86_uapi.kvm_clock_data.from_buffer_copy(self.clock)

    def to_wire(self) -> dict[str, Any]:
        return {
            **_W.header(),
            "cpu_vendor": self.cpu_vendor,
            "cpu_signature": self.cpu_signature,
            "vcpus": [v.to_wire() for v in self.vcpus],
            "irqchip": list(self.irqchip),
            "pit2": self.pit2,
            "clock": self.clock,
        }

    @classmethod
    def from_wire(cls, d: object) -> X86MachineState:
        _W.read_header(d)
        m = _mapping(d, "", _VM_KEYS)
        vendor = cpu_vendor_field(m)
        vcpus = _W.vcpus(m, MAX_VCPUS, X86VcpuState.from_wire)
        irqchip, pit2, clock = vm_devices(m)
        for v in vcpus:
            if bool(v.lapic) != bool(irqchip):
                raise StateFormatError(
                    f"x86 state: vcpus[{v.index}].lapic: "
                    + ("missing, but the VM has" if irqchip else "present, but the VM has no")
                    + " in-kernel irqchip"
                )
        return cls(
            cpu_vendor=vendor,
            cpu_signature=_int(m, "cpu_signature", "", 0, (1 << 32) - 1),
            vcpus=vcpus,
            irqchip=irqchip,
            pit2=pit2,
            clock=clock,
        )


# ---- wire validation helpers ----------------------------------------------------------------


def cpuid_entries(m: Mapping[str, Any], where: str) -> tuple[bytes, ...]:
    """A vCPU's `cpuid` list: raw struct kvm_cpuid_entry2 each, no (function, index) twice."""
    cpuid = _list(m, "cpuid", where, MAX_CPUID_ENTRIES)
    if not cpuid:
        raise _error(where, "cpuid", "no entries: a vCPU always has a CPUID")
    # Checked as a whole first, with builtins that loop in C, entry by entry (naming the bad
    # one) only when that fails: this runs in the target's downtime, where a Python loop over
    # the 75 entries cost more than the ioctls around it.
    if set(map(type, cpuid)) == {bytes} and set(map(len, cpuid)) == {_SIZE["cpuid"]}:
        entries = tuple(cpuid)
    else:
        entries = tuple(_sized(e, f"{where}.cpuid[{i}]", "cpuid") for i, e in enumerate(cpuid))
    # Each entry starts with its u32 function and u32 index.
    if len(set(map(_FUNCTION_AND_INDEX, entries))) != len(entries):
        raise _error(where, "cpuid", "the same (function, index) appears twice")
    return entries


def vm_devices(m: Mapping[str, Any]) -> tuple[tuple[bytes, ...], bytes, bytes]:
    """The VM-wide parts of a state's top level: the irqchips (none, or PIC master, slave and
    IOAPIC), the PIT (or b"") and kvmclock, checked."""
    chips = _list(m, "irqchip", "", len(IRQCHIP_IDS))
    if len(chips) not in (0, len(IRQCHIP_IDS)):
        raise _error("", "irqchip", f"{len(chips)} entries: expected 0 or 3 (PIC master, slave, IOAPIC)")
    irqchip = tuple(_sized(c, f"irqchip[{i}]", "irqchip") for i, c in enumerate(chips))
    for i, (chip, chip_id) in enumerate(zip(irqchip, IRQCHIP_IDS)):
        found = struct.unpack_from("<I", chip)[0]
        if found != chip_id:
            raise StateFormatError(
                f"x86 state: irqchip[{i}]: chip_id {found}, expected {chip_id} ({_IRQCHIP_NAMES[i]})"
            )
    pit2 = _bytes(m, "pit2", "")
    if len(pit2) not in (0, _SIZE["pit2"]):
        raise _error(
            "",
            "pit2",
            f"{len(pit2)} bytes: expected 0 (no PIT) or {_SIZE['pit2']} (struct kvm_pit_state2)",
        )
    if pit2 and not irqchip:
        raise _error("", "pit2", "an in-kernel PIT needs the in-kernel irqchip (absent)")
    return irqchip, pit2, _struct_bytes(m, "clock", "")


def cpu_vendor_field(m: Mapping[str, Any]) -> bytes:
    vendor = _bytes(m, "cpu_vendor", "")
    if len(vendor) != 12:
        raise _error("", "cpu_vendor", f"{len(vendor)} bytes, expected 12 (CPUID leaf 0)")
    return vendor


def _sized(value: object, path: str, kind: str) -> bytes:
    data = _bytes_value(value, path)
    if len(data) != _SIZE[kind]:
        raise StateFormatError(f"x86 state: {path}: {len(data)} bytes, expected {_SIZE[kind]} ({_STRUCT_NAME[kind]})")
    return data


def _struct_bytes(m: Mapping[str, Any], key: str, where: str) -> bytes:
    return _sized(m[key], f"{where}.{key}" if where else key, key)


def _msr_pairs(pairs: list[Any]) -> tuple[tuple[int, int], ...] | None:
    """[[index, value], ...] when every pair is well formed and no index repeats, else None
    (`_msr_pairs_checked` then names what is wrong). Checked with builtins that loop in C (the
    target's downtime): a pair is a list or tuple of two, both exact ints (a bool is not), in
    range."""
    if not pairs:
        return ()
    if not set(map(type, pairs)) <= {list, tuple} or set(map(len, pairs)) != {2}:
        return None
    indices, values = zip(*pairs)
    if set(map(type, indices)) != {int} or set(map(type, values)) != {int}:
        return None
    if min(indices) < 0 or max(indices) > 0xFFFF_FFFF or min(values) < 0 or max(values) > 0xFFFF_FFFF_FFFF_FFFF:
        return None
    if len(set(indices)) != len(indices):
        return None
    return tuple(zip(indices, values))


def _msr_pairs_checked(pairs: list[Any], where: str) -> tuple[tuple[int, int], ...]:
    msrs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for i, pair in enumerate(pairs):
        here = f"{where}.msrs[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise StateFormatError(f"x86 state: {here}: expected [index, value]")
        index = _int_value(pair[0], here + "[0]", 0, (1 << 32) - 1)
        value = _int_value(pair[1], here + "[1]", 0, (1 << 64) - 1)
        if index in seen:
            raise StateFormatError(f"x86 state: {here}: {msr_name(index)} appears twice")
        seen.add(index)
        msrs.append((index, value))
    return tuple(msrs)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@contextmanager
def _step(times: StepTimes | None, name: str) -> Iterator[None]:
    if times is None:
        yield
    else:
        with times.step(name):
            yield


# --------------------------------------------------------------------------------------------
# ioctl plumbing
# --------------------------------------------------------------------------------------------
def require_parked(vcpus: Sequence[Vcpu], doing: str) -> None:
    for vcpu in vcpus:
        if vcpu.may_run:  # not `state`: a vCPU just started has not yet said RUNNING
            raise StateError(f"vCPU {vcpu.index} is running: pause the VM (Vm.pause) before {doing} its state")


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def save_vcpu_state(
    vcpu: Vcpu,
    kvm: Kvm,
    *,
    lapic: bool = False,
    xsave2_bytes: int | None = None,
    msr_indices: Sequence[int] | None = None,
    times: StepTimes | None = None,
) -> X86VcpuState:
    """Read one vCPU's state. Its thread must be parked or not started.

    `lapic`: the VM has an in-kernel irqchip (KVM_GET_LAPIC fails without one).
    `xsave2_bytes`: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) of the VM (asked of `kvm` if None).
    `msr_indices`: MSRs to read (`kvm.msr_index_list()` if None).
    """
    require_parked([vcpu], "saving")
    xsave2 = xsave2_bytes if xsave2_bytes is not None else xsave2_size(kvm.fd)
    indices = list(kvm.msr_index_list() if msr_indices is None else msr_indices)
    if len(indices) > MAX_MSRS:
        raise StateError(f"{len(indices)} MSRs to save: more than the {MAX_MSRS} a state carries")
    with _step(times, "tsc_khz"):
        tsc_khz = read_tsc_khz(vcpu)
    with _step(times, "cpuid"):
        # Read when it was set (fixed.py: a vCPU's CPUID cannot change once it ran); KVM is asked
        # here only for a vCPU whose table was not read then.
        cpuid = cpuid_of(vcpu) or get_cpuid_bytes(vcpu)
    # One C call for the rest (ioctlbatch.h: ~5 us each there, 11-60 us each from Python), into
    # buffers made when the VM was built (statebuffers.py).
    plan = save_plan(vcpu, lapic, xsave2, indices)
    with _step(times, "vcpu_ioctls"):
        stopped = plan.batch.run()
    if stopped == plan.msrs_at:
        raise msrs_read_short(vcpu, indices, plan.batch.result(plan.msrs_at))
    with _step(times, "vcpu_copy"):
        state = X86VcpuState(
            index=vcpu.index,
            tsc_khz=tsc_khz,
            cpuid=cpuid,
            mp_state=int(plan.mp.mp_state),
            regs=bytes(plan.regs),
            sregs=bytes(plan.sregs),
            xsave=bytes(plan.xsave),
            xcrs=bytes(plan.xcrs),
            debugregs=bytes(plan.debugregs),
            lapic=b"" if plan.lapic is None else bytes(plan.lapic),
            msrs=tuple(msr_entries(plan.msrs, len(indices))),
            events=bytes(plan.events),
        )
    return state


def save_vm_state(vm: Vm, *, irqchip: bool, pit: bool) -> X86MachineState:
    """Read the whole machine's state. Every vCPU must be parked (`vm.pause()`) or not started.

    `irqchip` / `pit`: whether the VM was built with `create_irqchip` / `create_pit2`. They are
    checked against KVM, so a forgotten flag fails here instead of losing LAPIC or PIT state.
    The result carries per-step timings in `timings` (seconds).
    """
    times = StepTimes()
    start = time.perf_counter()
    require_parked(vm.vcpus, "saving")
    if not vm.vcpus:
        raise StateError("the VM has no vCPUs to save")
    with times.step("devices"):
        check_devices(vm, irqchip, pit, "save_vm_state")
    with times.step("setup"):
        host = host_facts(vm.kvm)  # read once per host, and per VM below (fixed.py)
        vendor, signature, indices = host.cpu_vendor, host.cpu_signature, host.msr_indices
        xsave2 = vm_xsave2_bytes(vm)
    vcpus = tuple(
        save_vcpu_state(vcpu, vm.kvm, lapic=irqchip, xsave2_bytes=xsave2, msr_indices=indices, times=times)
        for vcpu in vm.vcpus
    )
    with times.step("vm_ioctls"):
        chips, pit2, clock = save_vm_devices(vm, irqchip, pit)
    times.seconds["total"] = time.perf_counter() - start
    return X86MachineState(
        cpu_vendor=vendor,
        cpu_signature=signature,
        vcpus=vcpus,
        irqchip=chips,
        pit2=pit2,
        clock=clock,
        timings=dict(times.seconds),
    )


def save_vm_devices(vm: Vm, irqchip: bool, pit: bool) -> tuple[tuple[bytes, ...], bytes, bytes]:
    """The VM-wide parts, in one C call: the irqchips (or none), the PIT (or b""), kvmclock."""
    plan = vm_devices_plan(vm, "GET", irqchip, pit)  # made at the build (machine.py)
    plan.batch.run()
    return tuple(bytes(chip) for chip in plan.chips), b"" if plan.pit is None else bytes(plan.pit), bytes(plan.clock)


# --------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------
def check_compatible(state: X86MachineState, kvm: Kvm) -> None:
    """Refuse, with the reason, a state this host cannot run.

    The CPU must be the same vendor, family and model (the stepping may differ): the guest keeps
    the CPUID it was given, and on PVM hosts it sees the host's CPUID leaves anyway (DESIGN 7).
    Every saved MSR must be known to this host's KVM, the XSAVE area must fit, and the in-kernel
    devices the state has must be available.
    """
    # No ioctl after the first call, and the common case (the same CPU, MSRs known) decided with
    # comparisons and builtins that loop in C: this runs in the target's downtime.
    host = host_facts(kvm)
    check_cpu(state.cpu_vendor, state.cpu_signature, host)
    if all(host.known_msrs.issuperset(map(_MSR_INDEX, v.msrs)) for v in state.vcpus):
        unknown = []
    else:
        unknown = sorted({i for v in state.vcpus for i, _ in v.msrs} - host.known_msrs)
    check_host_has(unknown, max(len(v.xsave) for v in state.vcpus), state.has_irqchip, state.has_pit, host)


def check_cpu(vendor: bytes, signature: int, host: HostFacts) -> None:
    """The same CPU vendor, family and model as this host (the stepping may differ)."""
    if (vendor, signature) != (host.cpu_vendor, host.cpu_signature):
        here, saved = host.cpu_model, CpuModel.from_cpuid(vendor, signature)
        if (here.vendor, here.family, here.model) != (saved.vendor, saved.family, saved.model):
            raise IncompatibleStateError(
                f"the VM's state was saved on {saved}; this host is {here}: migrated moves VMs "
                "only between hosts with the same CPU vendor, family and model"
            )


def check_host_has(unknown: Sequence[int], largest_xsave: int, irqchip: bool, pit: bool, host: HostFacts) -> None:
    """No MSR unknown here (`unknown`, sorted), the XSAVE area fits, the devices exist."""
    if unknown:
        raise IncompatibleStateError(
            f"{len(unknown)} MSR(s) of the VM are unknown to this host's KVM: "
            + ", ".join(msr_name(i) for i in unknown[:8])
            + (" ..." if len(unknown) > 8 else "")
        )
    size = host.xsave_bytes
    if largest_xsave > size:
        raise IncompatibleStateError(
            f"the VM's XSAVE area is {largest_xsave} bytes; this host's KVM offers {size} "
            "(KVM_CAP_XSAVE2): a state component is missing here"
        )
    if irqchip and not host.irqchip:
        raise IncompatibleStateError("the VM has an in-kernel irqchip; this host's KVM has none")
    if pit and not host.pit_state2:
        raise IncompatibleStateError("the VM has an in-kernel PIT; this host's KVM lacks KVM_CAP_PIT_STATE2")


# --------------------------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------------------------
EVENTS_SET_FLAGS = x86_uapi.KVM_VCPUEVENT_VALID_NMI_PENDING | x86_uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR


def restore_tsc_khz_and_cpuid(
    vcpu: Vcpu, tsc_khz: int, cpuid: tuple[bytes, ...] | None, times: StepTimes | None
) -> None:
    """The parts of a vCPU's state that go first, each only where it differs from the vCPU's
    (`cpuid` None: the caller found it set)."""
    if tsc_khz:
        with _step(times, "tsc_khz"):
            here = tsc_khz_of(vcpu)  # read at the build (fixed.py)
            if here != tsc_khz:
                try:
                    vcpu.ioctl("KVM_SET_TSC_KHZ", x86_uapi.KVM_SET_TSC_KHZ, tsc_khz)
                    note_tsc_khz(vcpu, tsc_khz)
                except KvmIoctlError as err:
                    raise IncompatibleStateError(
                        f"vCPU {vcpu.index}: the guest's TSC runs at {tsc_khz} kHz, this "
                        f"host's at {here} kHz, and KVM cannot scale it ({err})"
                    ) from err
    with _step(times, "cpuid"):
        try:
            # Already set when the VM was built with the source's table (VmConfig.cpuid). Else
            # (an older source) set here, and read back so that this VM's next migration finds
            # its table known (fixed.py): once, in this window, rather than in every later one.
            if cpuid is not None and not cpuid_is_set(vcpu, cpuid):
                set_cpuid(vcpu, cpuid_buffer_of(cpuid))
        except KvmIoctlError as err:
            if err.errno != errno.EINVAL:
                raise
            raise StateError(
                f"{err}: KVM refuses a CPUID different from the one a vCPU already ran with "
                "(Linux 5.16+); restore into vCPUs that never ran"
            ) from err


def restore_vcpu_state(
    vcpu: Vcpu,
    state: X86VcpuState,
    *,
    xsave2_bytes: int = 0,
    times: StepTimes | None = None,
) -> list[int]:
    """Write one vCPU's state in the order KVM accepts (module docstring).

    Returns the MSRs KVM refused to write although they already held the saved value (see
    `set_msrs`); every other refusal raises.

    The vCPU must never have run (KVM accepts another CPUID after KVM_RUN only if identical) and
    its thread must be parked or not started. Guest RAM should already be in place (R9).
    `xsave2_bytes`: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) of the target VM; the XSAVE buffer is
    zero-padded to it, since KVM_SET_XSAVE reads that many bytes (api.rst 4.43).
    """
    require_parked([vcpu], "restoring")
    restore_tsc_khz_and_cpuid(vcpu, state.tsc_khz, state.cpuid, times)
    # One C call for the rest, in this order (ioctlbatch.h), from buffers made when the VM was
    # built (statebuffers.py). KVM_SET_MSRS stops it where KVM refused an MSR: `finish_set_msrs`
    # decides that one and writes the rest before the batch goes on.
    msrs = restore_msr_order(state.msrs)
    with _step(times, "vcpu_buffers"):
        plan = restore_plan(vcpu, bool(state.lapic), max(len(state.xsave), xsave2_bytes), len(msrs))
        plan.fill(
            mp_state=state.mp_state,
            regs=state.regs,
            sregs=state.sregs,
            xsave=state.xsave,
            xcrs=state.xcrs,
            debugregs=state.debugregs,
            lapic=state.lapic,
            msrs=msrs,
            events=state.events,
            # KVM_GET_VCPU_EVENTS reports VALID_SHADOW / SMM / PAYLOAD / TRIPLE_FAULT for the
            # fields it filled; nmi.pending and sipi_vector are written only when asked for
            # (api.rst 4.32).
            events_flags=EVENTS_SET_FLAGS,
        )
    kept: list[int] = []
    with _step(times, "vcpu_ioctls"):
        stopped = plan.batch.run()
        if stopped == plan.msrs_at:
            kept = finish_set_msrs(vcpu, msrs, plan.batch.result(plan.msrs_at))
            plan.batch.run(plan.msrs_at + 1)
    return kept


def restore_vm_state(
    vm: Vm,
    state: X86MachineState,
    *,
    irqchip: bool,
    pit: bool,
    check: bool = True,
    advance_clock: bool = False,
) -> RestoreReport:
    """Write the whole machine's state into `vm`, built like the source and never run.

    `vm` has as many vCPUs as the state, and the in-kernel devices the state has (`irqchip`,
    `pit`: as for `save_vm_state`, checked against KVM). Guest RAM must be in place first (R9).
    `check`: run `check_compatible` first.

    kvmclock: by default it continues from the saved value, as the TSC does from its saved MSR,
    so the guest sees the downtime as a pause on both clocks, whatever the hosts' wall clocks
    say. With `advance_clock`, KVM_CLOCK_REALTIME is passed when the saved clock carries a host
    real time and this KVM accepts the flag: KVM then adds the real time elapsed since the save
    (never stepping back), which is right only between hosts with synchronized clocks. No other
    flag is passed: KVM_GET_CLOCK's TSC_STABLE and HOST_TSC are output only (api.rst: "accepted
    but ignored"; kernels before 5.16 refuse any flag).
    """
    times = StepTimes()
    start = time.perf_counter()
    check_restorable(vm, len(state.vcpus), (state.has_irqchip, state.has_pit), (irqchip, pit))
    with times.step("devices"):
        check_devices(vm, irqchip, pit, "restore_vm_state")
    if check:
        with times.step("check"):
            check_compatible(state, vm.kvm)
    with times.step("setup"):
        xsave2 = vm_xsave2_bytes(vm)
    kept: list[tuple[int, int]] = []
    for vcpu, vcpu_state in zip(vm.vcpus, state.vcpus):
        for index in restore_vcpu_state(vcpu, vcpu_state, xsave2_bytes=xsave2, times=times):
            kept.append((vcpu.index, index))
    with times.step("vm_ioctls"):
        advanced = restore_vm_devices(vm, state.irqchip, state.pit2, state.clock, advance_clock)
    times.seconds["total"] = time.perf_counter() - start
    return RestoreReport(timings=dict(times.seconds), clock_advanced=advanced, msrs_kept=tuple(kept))


def check_restorable(vm: Vm, vcpus: int, has: tuple[bool, bool], told: tuple[bool, bool]) -> None:
    """A target built like the source: as many vCPUs, all parked, and the in-kernel irqchip and
    PIT the state has (`has`), as the caller was told (`told`: `check_devices` checks it)."""
    if len(vm.vcpus) != vcpus:
        raise IncompatibleStateError(f"the state has {vcpus} vCPU(s); the target VM has {len(vm.vcpus)}")
    for name, had, said in zip(("irqchip", "PIT"), has, told):
        if had != said:
            raise IncompatibleStateError(
                f"the source VM {'had' if had else 'had no'} in-kernel {name}; the target is "
                f"told {name}={said}: build the target like the source"
            )
    require_parked(vm.vcpus, "restoring")


def restore_vm_devices(vm: Vm, irqchip: Sequence[bytes], pit2: bytes, clock_bytes: bytes, advance_clock: bool) -> bool:
    """The VM-wide parts after every vCPU, in one C call, kvmclock last. Returns whether KVM was
    asked to advance kvmclock by the real time elapsed (`restore_vm_state`)."""
    plan = vm_devices_plan(vm, "SET", bool(irqchip), bool(pit2))  # made at the build (machine.py)
    for chip, data in zip(plan.chips, irqchip):
        ctypes.memmove(ctypes.addressof(chip), data, len(data))
    if plan.pit is not None:
        ctypes.memmove(ctypes.addressof(plan.pit), pit2, len(pit2))
    clock = plan.clock
    ctypes.memmove(ctypes.addressof(clock), clock_bytes, len(clock_bytes))
    flags = 0
    if (
        advance_clock
        and clock.flags & x86_uapi.KVM_CLOCK_REALTIME
        and vm.kvm.check_extension(x86_uapi.KVM_CAP_ADJUST_CLOCK) & x86_uapi.KVM_CLOCK_REALTIME
    ):
        flags = x86_uapi.KVM_CLOCK_REALTIME
    clock.flags = flags
    plan.batch.run()
    return bool(flags)
