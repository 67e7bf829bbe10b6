"""The buffers and the ioctl batch of a vCPU's state save and restore (state.py), made when the
VM is built (`prepare`) and reused by every save and restore of that vCPU after.

Why ahead: a save or restore runs inside the downtime, and what it would allocate there is
memory it touches first, which is what costs most on this project's hosts (a nested, software
hypervisor: HOST-NOTES "Fresh memory"). Measured in migrations (bench/fixed_cost.py, the
target's `restore_steps_ms`): making a restore's ten buffers took 0.13-0.25 ms there, 0.03 ms
warm, and the batch's ioctls 0.16-0.35 ms against 0.08 warm.

One plan per vCPU and shape: the save's (in-kernel LAPIC or not, the XSAVE size, the MSR
indices) is this host's; the restore's follows the state (LAPIC or not, the XSAVE size, the MSR
count), the host's expected, another made when a state differs (an older source's, say).
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ... import uapi
from ...ioctlbatch import IoctlBatch
from ...vcpu import Vcpu
from ...vm import Vm
from . import uapi as x86_uapi
from .cpu import pack_msrs_into

IRQCHIP_IDS = (x86_uapi.KVM_IRQCHIP_PIC_MASTER, x86_uapi.KVM_IRQCHIP_PIC_SLAVE, x86_uapi.KVM_IRQCHIP_IOAPIC)
MIN_XSAVE_BYTES = ctypes.sizeof(x86_uapi.kvm_xsave)  # 4096: "always at least 4096" (api.rst)


# The ioctl of each part, each way; a plan lists the parts in the order KVM accepts them back
# (state.py): MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS, VCPU_EVENTS.
_REQUESTS: dict[tuple[str, str], int] = {
    ("GET", "MP_STATE"): uapi.KVM_GET_MP_STATE,
    ("SET", "MP_STATE"): uapi.KVM_SET_MP_STATE,
    ("GET", "REGS"): uapi.KVM_GET_REGS,
    ("SET", "REGS"): uapi.KVM_SET_REGS,
    ("GET", "SREGS"): uapi.KVM_GET_SREGS,
    ("SET", "SREGS"): uapi.KVM_SET_SREGS,
    ("GET", "XSAVE"): x86_uapi.KVM_GET_XSAVE,
    ("GET", "XSAVE2"): x86_uapi.KVM_GET_XSAVE2,
    ("SET", "XSAVE"): x86_uapi.KVM_SET_XSAVE,
    ("GET", "XCRS"): x86_uapi.KVM_GET_XCRS,
    ("SET", "XCRS"): x86_uapi.KVM_SET_XCRS,
    ("GET", "DEBUGREGS"): x86_uapi.KVM_GET_DEBUGREGS,
    ("SET", "DEBUGREGS"): x86_uapi.KVM_SET_DEBUGREGS,
    ("GET", "LAPIC"): x86_uapi.KVM_GET_LAPIC,
    ("SET", "LAPIC"): x86_uapi.KVM_SET_LAPIC,
    ("GET", "MSRS"): x86_uapi.KVM_GET_MSRS,
    ("SET", "MSRS"): x86_uapi.KVM_SET_MSRS,
    ("GET", "VCPU_EVENTS"): uapi.KVM_GET_VCPU_EVENTS,
    ("SET", "VCPU_EVENTS"): uapi.KVM_SET_VCPU_EVENTS,
}


# The parts of a vCPU's state in the order KVM takes them back (state.py), as they lie in a block.
PARTS = ("MP_STATE", "REGS", "SREGS", "XSAVE", "XCRS", "DEBUGREGS", "LAPIC", "MSRS", "VCPU_EVENTS")
_FIXED_SIZES = {
    "MP_STATE": ctypes.sizeof(uapi.kvm_mp_state),
    "REGS": ctypes.sizeof(uapi.kvm_regs),
    "SREGS": ctypes.sizeof(uapi.kvm_sregs),
    "XCRS": ctypes.sizeof(x86_uapi.kvm_xcrs),
    "DEBUGREGS": ctypes.sizeof(x86_uapi.kvm_debugregs),
    "LAPIC": ctypes.sizeof(x86_uapi.kvm_lapic_state),
    "VCPU_EVENTS": ctypes.sizeof(x86_uapi.kvm_vcpu_events),
}
MSRS_HEADER_BYTES = ctypes.sizeof(x86_uapi.kvm_msrs)
MSR_ENTRY_BYTES = ctypes.sizeof(x86_uapi.kvm_msr_entry)
MSR_VALUE_OFFSET = x86_uapi.kvm_msr_entry.data.offset  # u32 index, u32 reserved, u64 data
_ALIGN = 8  # every part starts 8-byte aligned, as the kernel's structs are


@dataclass(frozen=True)
class BlockLayout:
    """Where each part of one vCPU's state lies in its block: the plan's one buffer, and the
    flat state's per-vCPU bytes (flatstate.py), which are that buffer as KVM filled it."""

    lapic: bool
    xsave_bytes: int
    msr_count: int
    offsets: dict[str, int]
    sizes: dict[str, int]
    size: int

    def part(self, block: bytes | memoryview, name: str) -> bytes | memoryview:
        at = self.offsets[name]
        return block[at : at + self.sizes[name]]


@functools.cache
def block_layout(lapic: bool, xsave_bytes: int, msr_count: int) -> BlockLayout:
    """The layout of a vCPU's block for that shape (no LAPIC part without an in-kernel irqchip)."""
    sizes = dict(_FIXED_SIZES, XSAVE=xsave_bytes, MSRS=MSRS_HEADER_BYTES + MSR_ENTRY_BYTES * msr_count)
    if not lapic:
        del sizes["LAPIC"]
    offsets: dict[str, int] = {}
    at = 0
    for name in PARTS:
        if name in sizes:
            offsets[name] = at
            at += -(-sizes[name] // _ALIGN) * _ALIGN
    return BlockLayout(lapic, xsave_bytes, msr_count, offsets, {name: sizes[name] for name in offsets}, at)


class _VcpuPlan:
    """One vCPU's buffers, all in one block laid out as `block_layout` says, and its batch over
    them one way (GET: the save; SET: the restore)."""

    def __init__(
        self,
        vcpu: Vcpu,
        way: str,
        lapic: bool,
        xsave: tuple[str, int],
        msrs: Sequence[tuple[int, int]],
    ) -> None:
        """`xsave`: the XSAVE part's ioctl name ("XSAVE" or "XSAVE2") and its size; `msrs`: the
        (index, value) pairs the MSR part starts with."""
        who, fd = f"vCPU {vcpu.index}", vcpu.fd
        self.layout = layout = block_layout(lapic, xsave[1], len(msrs))
        self.block = block = (ctypes.c_uint8 * layout.size)()
        at = layout.offsets
        self.mp = uapi.kvm_mp_state.from_buffer(block, at["MP_STATE"])
        self.regs = uapi.kvm_regs.from_buffer(block, at["REGS"])
        self.sregs = uapi.kvm_sregs.from_buffer(block, at["SREGS"])
        self.xsave = (ctypes.c_uint8 * xsave[1]).from_buffer(block, at["XSAVE"])
        self.xcrs = x86_uapi.kvm_xcrs.from_buffer(block, at["XCRS"])
        self.debugregs = x86_uapi.kvm_debugregs.from_buffer(block, at["DEBUGREGS"])
        self.lapic = x86_uapi.kvm_lapic_state.from_buffer(block, at["LAPIC"]) if lapic else None
        self.msrs = (ctypes.c_uint8 * layout.sizes["MSRS"]).from_buffer(block, at["MSRS"])
        pack_msrs_into(self.msrs, msrs)
        self.events = x86_uapi.kvm_vcpu_events.from_buffer(block, at["VCPU_EVENTS"])
        parts: list[tuple[str, Any]] = [
            ("MP_STATE", self.mp),
            ("REGS", self.regs),
            ("SREGS", self.sregs),
            (xsave[0], self.xsave),
            ("XCRS", self.xcrs),
            ("DEBUGREGS", self.debugregs),
        ]
        if self.lapic is not None:
            parts.append(("LAPIC", self.lapic))
        self.batch = batch = IoctlBatch()
        for name, buffer in parts:
            batch.add(f"{who}: KVM_{way}_{name}", fd, _REQUESTS[way, name], buffer)
        self.msrs_at = batch.add(f"{who}: KVM_{way}_MSRS", fd, _REQUESTS[way, "MSRS"], self.msrs, expect=len(msrs))
        batch.add(f"{who}: KVM_{way}_VCPU_EVENTS", fd, _REQUESTS[way, "VCPU_EVENTS"], self.events)
        batch.prepare()


class VcpuSave(_VcpuPlan):
    """The save: every part read from KVM into these buffers."""

    def __init__(self, vcpu: Vcpu, lapic: bool, xsave2: int, indices: tuple[int, ...]) -> None:
        self.shape = (lapic, xsave2, indices)
        # KVM_GET_XSAVE2 writes as many bytes as KVM_CAP_XSAVE2 says (never below 4096).
        xsave = ("XSAVE2", max(xsave2, MIN_XSAVE_BYTES)) if xsave2 > 0 else ("XSAVE", MIN_XSAVE_BYTES)
        super().__init__(vcpu, "GET", lapic, xsave, [(index, 0) for index in indices])


class VcpuRestore(_VcpuPlan):
    """The restore: `fill` copies a state's bytes in, the batch writes them to KVM."""

    def __init__(self, vcpu: Vcpu, lapic: bool, xsave_bytes: int, msr_count: int) -> None:
        self.shape = (lapic, xsave_bytes, msr_count)
        super().__init__(vcpu, "SET", lapic, ("XSAVE", xsave_bytes), [(0, 0)] * msr_count)

    def fill(
        self,
        *,
        mp_state: int,
        regs: bytes,
        sregs: bytes,
        xsave: bytes,
        xcrs: bytes,
        debugregs: bytes,
        lapic: bytes,
        msrs: Sequence[tuple[int, int]],
        events: bytes,
        events_flags: int,
    ) -> None:
        """The state's bytes (their sizes checked by the state's `from_wire`), the XSAVE area
        zero-padded to this plan's size (KVM_SET_XSAVE reads that many bytes, api.rst 4.43);
        `events_flags` added to the events' flags."""
        self.mp.mp_state = mp_state
        for buffer, data in (
            (self.regs, regs),
            (self.sregs, sregs),
            (self.xcrs, xcrs),
            (self.debugregs, debugregs),
            (self.events, events),
        ):
            ctypes.memmove(ctypes.addressof(buffer), data, len(data))
        if self.lapic is not None:
            ctypes.memmove(ctypes.addressof(self.lapic), lapic, len(lapic))
        ctypes.memmove(self.xsave, xsave, len(xsave))
        ctypes.memset(ctypes.addressof(self.xsave) + len(xsave), 0, len(self.xsave) - len(xsave))
        pack_msrs_into(self.msrs, msrs)
        self.batch.expect(self.msrs_at, len(msrs))  # a flat restore may have left out some (flatstate.py)
        self.events.flags |= events_flags


_SAVES: weakref.WeakKeyDictionary[Vcpu, VcpuSave] = weakref.WeakKeyDictionary()
_RESTORES: weakref.WeakKeyDictionary[Vcpu, VcpuRestore] = weakref.WeakKeyDictionary()


def save_plan(vcpu: Vcpu, lapic: bool, xsave2: int, indices: Sequence[int]) -> VcpuSave:
    """This vCPU's save plan for that shape: the one made at the build, or a new one kept."""
    shape = (lapic, xsave2, tuple(indices))
    plan = _SAVES.get(vcpu)
    if plan is None or plan.shape != shape:
        plan = _SAVES[vcpu] = VcpuSave(vcpu, *shape)
    return plan


def restore_plan(vcpu: Vcpu, lapic: bool, xsave_bytes: int, msr_count: int) -> VcpuRestore:
    """This vCPU's restore plan for that shape: the one made at the build, or a new one kept."""
    shape = (lapic, xsave_bytes, msr_count)
    plan = _RESTORES.get(vcpu)
    if plan is None or plan.shape != shape:
        plan = _RESTORES[vcpu] = VcpuRestore(vcpu, *shape)
    return plan


_VM_REQUESTS: dict[tuple[str, str], int] = {
    ("GET", "IRQCHIP"): x86_uapi.KVM_GET_IRQCHIP,
    ("SET", "IRQCHIP"): x86_uapi.KVM_SET_IRQCHIP,
    ("GET", "PIT2"): x86_uapi.KVM_GET_PIT2,
    ("SET", "PIT2"): x86_uapi.KVM_SET_PIT2,
    ("GET", "CLOCK"): x86_uapi.KVM_GET_CLOCK,
    ("SET", "CLOCK"): x86_uapi.KVM_SET_CLOCK,
}


class VmDevices:
    """The VM-wide parts' buffers (the irqchips, the PIT, kvmclock) and their batch one way (GET:
    the save; SET: the restore), in the order KVM takes them back, kvmclock last."""

    def __init__(self, vm: Vm, way: str, irqchip: bool, pit: bool) -> None:
        self.shape = (irqchip, pit)
        self.chips = [x86_uapi.kvm_irqchip(chip_id=chip_id) for chip_id in (IRQCHIP_IDS if irqchip else ())]
        self.pit = x86_uapi.kvm_pit_state2() if pit else None
        self.clock = x86_uapi.kvm_clock_data()
        self.batch = batch = IoctlBatch()
        for chip in self.chips:
            batch.add(f"KVM_{way}_IRQCHIP({chip.chip_id})", vm.fd, _VM_REQUESTS[way, "IRQCHIP"], chip)
        if self.pit is not None:
            batch.add(f"KVM_{way}_PIT2", vm.fd, _VM_REQUESTS[way, "PIT2"], self.pit)
        batch.add(f"KVM_{way}_CLOCK", vm.fd, _VM_REQUESTS[way, "CLOCK"], self.clock)
        batch.prepare()


_DEVICES: weakref.WeakKeyDictionary[Vm, dict[str, VmDevices]] = weakref.WeakKeyDictionary()


def vm_devices_plan(vm: Vm, way: str, irqchip: bool, pit: bool) -> VmDevices:
    """The VM's devices plan that way for that shape: the one made at the build, or a new one kept."""
    plans = _DEVICES.setdefault(vm, {})
    plan = plans.get(way)
    if plan is None or plan.shape != (irqchip, pit):
        plan = plans[way] = VmDevices(vm, way, irqchip, pit)
    return plan
