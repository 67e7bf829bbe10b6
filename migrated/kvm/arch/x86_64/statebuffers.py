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

from ... import uapi
from ...ioctlbatch import IoctlBatch
from ...vcpu import Vcpu
from . import uapi as x86_uapi
from .cpu import msr_buffer, pack_msrs_into

MIN_XSAVE_BYTES = ctypes.sizeof(x86_uapi.kvm_xsave)  # 4096: "always at least 4096" (api.rst)


class VcpuSave:
    """KVM_GET_MP_STATE, REGS, SREGS, XSAVE(2), XCRS, DEBUGREGS, LAPIC, MSRS and VCPU_EVENTS."""

    def __init__(self, vcpu: Vcpu, lapic: bool, xsave2: int, indices: tuple[int, ...]) -> None:
        self.shape = (lapic, xsave2, indices)
        who, fd = f"vCPU {vcpu.index}", vcpu.fd
        self.batch = batch = IoctlBatch()
        self.mp = uapi.kvm_mp_state()
        batch.add(f"{who}: KVM_GET_MP_STATE", fd, uapi.KVM_GET_MP_STATE, self.mp)
        self.regs = uapi.kvm_regs()
        batch.add(f"{who}: KVM_GET_REGS", fd, uapi.KVM_GET_REGS, self.regs)
        self.sregs = uapi.kvm_sregs()
        batch.add(f"{who}: KVM_GET_SREGS", fd, uapi.KVM_GET_SREGS, self.sregs)
        if xsave2 > 0:
            # KVM_GET_XSAVE2 writes as many bytes as KVM_CAP_XSAVE2 says (never below 4096).
            self.xsave = (ctypes.c_uint8 * max(xsave2, MIN_XSAVE_BYTES))()
            batch.add(f"{who}: KVM_GET_XSAVE2", fd, x86_uapi.KVM_GET_XSAVE2, self.xsave)
        else:
            self.xsave = (ctypes.c_uint8 * MIN_XSAVE_BYTES)()
            batch.add(f"{who}: KVM_GET_XSAVE", fd, x86_uapi.KVM_GET_XSAVE, self.xsave)
        self.xcrs = x86_uapi.kvm_xcrs()
        batch.add(f"{who}: KVM_GET_XCRS", fd, x86_uapi.KVM_GET_XCRS, self.xcrs)
        self.debugregs = x86_uapi.kvm_debugregs()
        batch.add(f"{who}: KVM_GET_DEBUGREGS", fd, x86_uapi.KVM_GET_DEBUGREGS, self.debugregs)
        self.lapic = x86_uapi.kvm_lapic_state() if lapic else None
        if self.lapic is not None:
            batch.add(f"{who}: KVM_GET_LAPIC", fd, x86_uapi.KVM_GET_LAPIC, self.lapic)
        self.msrs = msr_buffer([(index, 0) for index in indices])
        self.msrs_at = batch.add(f"{who}: KVM_GET_MSRS", fd, x86_uapi.KVM_GET_MSRS, self.msrs, expect=len(indices))
        self.events = x86_uapi.kvm_vcpu_events()
        batch.add(f"{who}: KVM_GET_VCPU_EVENTS", fd, uapi.KVM_GET_VCPU_EVENTS, self.events)
        batch.prepare()


class VcpuRestore:
    """KVM_SET_MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS and VCPU_EVENTS, in
    the order KVM accepts (state.py); `fill` copies a state's bytes in."""

    def __init__(self, vcpu: Vcpu, lapic: bool, xsave_bytes: int, msr_count: int) -> None:
        self.shape = (lapic, xsave_bytes, msr_count)
        who, fd = f"vCPU {vcpu.index}", vcpu.fd
        self.batch = batch = IoctlBatch()
        self.mp = uapi.kvm_mp_state()
        batch.add(f"{who}: KVM_SET_MP_STATE", fd, uapi.KVM_SET_MP_STATE, self.mp)
        self.regs = uapi.kvm_regs()
        batch.add(f"{who}: KVM_SET_REGS", fd, uapi.KVM_SET_REGS, self.regs)
        self.sregs = uapi.kvm_sregs()
        batch.add(f"{who}: KVM_SET_SREGS", fd, uapi.KVM_SET_SREGS, self.sregs)
        self.xsave = (ctypes.c_uint8 * xsave_bytes)()
        batch.add(f"{who}: KVM_SET_XSAVE", fd, x86_uapi.KVM_SET_XSAVE, self.xsave)
        self.xcrs = x86_uapi.kvm_xcrs()
        batch.add(f"{who}: KVM_SET_XCRS", fd, x86_uapi.KVM_SET_XCRS, self.xcrs)
        self.debugregs = x86_uapi.kvm_debugregs()
        batch.add(f"{who}: KVM_SET_DEBUGREGS", fd, x86_uapi.KVM_SET_DEBUGREGS, self.debugregs)
        self.lapic = x86_uapi.kvm_lapic_state() if lapic else None
        if self.lapic is not None:
            batch.add(f"{who}: KVM_SET_LAPIC", fd, x86_uapi.KVM_SET_LAPIC, self.lapic)
        self.msrs = msr_buffer([(0, 0)] * msr_count)
        self.msrs_at = batch.add(f"{who}: KVM_SET_MSRS", fd, x86_uapi.KVM_SET_MSRS, self.msrs, expect=msr_count)
        self.events = x86_uapi.kvm_vcpu_events()
        batch.add(f"{who}: KVM_SET_VCPU_EVENTS", fd, uapi.KVM_SET_VCPU_EVENTS, self.events)
        batch.prepare()

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
