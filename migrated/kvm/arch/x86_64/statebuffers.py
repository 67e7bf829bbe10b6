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
import weakref
from collections.abc import Sequence
from typing import Any

from ... import uapi
from ...ioctlbatch import IoctlBatch
from ...vcpu import Vcpu
from . import uapi as x86_uapi
from .cpu import msr_buffer, pack_msrs_into

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


class _VcpuPlan:
    """One vCPU's buffers, and its batch over them one way (GET: the save; SET: the restore)."""

    def __init__(
        self,
        vcpu: Vcpu,
        way: str,
        lapic: bool,
        xsave: tuple[str, int],
        msrs: ctypes.Array[ctypes.c_uint8],
        msr_count: int,
    ) -> None:
        """`xsave`: the XSAVE part's name ("XSAVE" or "XSAVE2") and its buffer's size; `msrs`: a
        `msr_buffer` of `msr_count` entries."""
        who, fd = f"vCPU {vcpu.index}", vcpu.fd
        self.mp = uapi.kvm_mp_state()
        self.regs = uapi.kvm_regs()
        self.sregs = uapi.kvm_sregs()
        self.xsave = (ctypes.c_uint8 * xsave[1])()
        self.xcrs = x86_uapi.kvm_xcrs()
        self.debugregs = x86_uapi.kvm_debugregs()
        self.lapic = x86_uapi.kvm_lapic_state() if lapic else None
        self.msrs = msrs
        self.events = x86_uapi.kvm_vcpu_events()
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
        self.msrs_at = batch.add(f"{who}: KVM_{way}_MSRS", fd, _REQUESTS[way, "MSRS"], msrs, expect=msr_count)
        batch.add(f"{who}: KVM_{way}_VCPU_EVENTS", fd, _REQUESTS[way, "VCPU_EVENTS"], self.events)
        batch.prepare()


class VcpuSave(_VcpuPlan):
    """The save: every part read from KVM into these buffers."""

    def __init__(self, vcpu: Vcpu, lapic: bool, xsave2: int, indices: tuple[int, ...]) -> None:
        self.shape = (lapic, xsave2, indices)
        # KVM_GET_XSAVE2 writes as many bytes as KVM_CAP_XSAVE2 says (never below 4096).
        xsave = ("XSAVE2", max(xsave2, MIN_XSAVE_BYTES)) if xsave2 > 0 else ("XSAVE", MIN_XSAVE_BYTES)
        super().__init__(vcpu, "GET", lapic, xsave, msr_buffer([(index, 0) for index in indices]), len(indices))


class VcpuRestore(_VcpuPlan):
    """The restore: `fill` copies a state's bytes in, the batch writes them to KVM."""

    def __init__(self, vcpu: Vcpu, lapic: bool, xsave_bytes: int, msr_count: int) -> None:
        self.shape = (lapic, xsave_bytes, msr_count)
        super().__init__(vcpu, "SET", lapic, ("XSAVE", xsave_bytes), msr_buffer([(0, 0)] * msr_count), msr_count)

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
