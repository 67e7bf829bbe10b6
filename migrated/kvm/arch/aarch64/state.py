"""arm64 machine state: saved from a paused VM, restored into a fresh one (DESIGN R6.3, R9).

The VM is built by `devices.py` (vCPU init, vGIC v3, ITS), its registers are read through
`registers.py` (ONE_REG), the vGIC's register maps and restore orders are in `gic_registers.py`.
The orders kept across them, each quoted next to the code that keeps it:

  creation  every vCPU created -> KVM_ARM_VCPU_INIT on each (api.rst 4.82: "all vcpus should be
            created before this ioctl is invoked") -> vGIC v3: distributor and redistributor
            addresses, NR_IRQS, CTRL_INIT ("Must be called after all VCPUs have been created")
            -> ITS: base address, CTRL_INIT.
  save      (R6.3, every vCPU parked) ONE_REG registers of every vCPU (KVM_GET_REG_LIST: core,
            system and timer registers), MP_STATE, VCPU_EVENTS; distributor, SPI line levels,
            per-vCPU redistributor and CPU interface registers; ITS registers. Separately, and
            where the migration puts it, `save_its_tables`: VGIC_SAVE_PENDING_TABLES, then
            ITS_SAVE_TABLES, which write guest RAM with no vCPU running.
  restore   (R9, arm-vgic-its.rst "ITS Restore Sequence") memory first (the caller's), vCPU
            registers, the distributor (GICD_IIDR first), redistributors, CPU interfaces, the ITS
            base address, GITS_CBASER, GITS_IIDR, GITS_CREADR, GITS_CWRITER, GITS_BASER<n>,
            ITS_RESTORE_TABLES, GITS_CTLR last.

Threads: like the x86 state, every state call needs the vCPUs parked (`Vm.pause()`) or not started;
the vGIC answers EBUSY to most of them while a vCPU is in KVM_RUN anyway.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ... import uapi
from . import uapi as arm_uapi
from ...saved_state import (
    IncompatibleStateError,
    RestoreReport,
    StateError,
    StateFormatError,
    StepTimes,
    WireReader,
)
from ...vcpu import Vcpu
from ...vm import Vm
from .devices import (
    GICD_BASE,
    GICR_BASE,
    MAX_NR_IRQS,
    MIN_NR_IRQS,
    Device,
    its_address,
    its_device,
    machine,
    set_its_address,
    vgic_device,
)
from .gic_registers import (
    CLEAR_TWIN,
    GICD_ICFGR,
    GITS_CTLR,
    ICC_CTLR_EL1,
    ICC_NAMES,
    ITS_NAMES,
    ITS_REGS_BEFORE_TABLES,
    ITS_SAVED,
    dist_clear_twin,
    dist_restore_order,
    icc_restore_order,
    redist_restore_order,
    spi_words,
)
from .registers import (
    CORE_REGS,
    MAX_REG_BYTES,
    MAX_REGS,
    MPIDR_EL1,
    cpu_attr,
    get_one_reg,
    reg_list,
    reg_name,
    reg_size,
    set_one_reg,
)


# Bounds on what a peer may send (DESIGN section 6).
MAX_VCPUS = 512  # KVM_MAX_VCPUS on arm64


# Wire checks shared with the other architecture's state (migrated/kvm/wire.py).
_W = WireReader("arm64 state")
_error, _mapping, _int_value, _int = _W.error, _W.mapping, _W.int_value, _W.int_field
_bytes_value, _bytes, _list = _W.bytes_value, _W.bytes_field, _W.list_field


# --------------------------------------------------------------------------------------------
# vCPU checks
# --------------------------------------------------------------------------------------------
def _require_parked(vcpus: Sequence[Vcpu], doing: str) -> None:
    for vcpu in vcpus:
        if vcpu.may_run:  # not `state`: a vCPU just started has not yet said RUNNING
            raise StateError(f"vCPU {vcpu.index} is running: pause the VM (Vm.pause) before {doing} its state")


# --------------------------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------------------------
Pairs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Arm64VcpuState:
    """One vCPU: its registers (raw ONE_REG values), power state, pending SError, and its
    redistributor and CPU interface."""

    index: int
    mp_state: int  # KVM_MP_STATE_RUNNABLE, _STOPPED (powered off) or _SUSPENDED
    events: bytes  # arm64 struct kvm_vcpu_events
    regs: tuple[tuple[int, bytes], ...]  # (ONE_REG id, KVM_REG_SIZE(id) bytes), REG_LIST order
    redist: Pairs  # (GICR offset, u32)
    icc: Pairs  # (CPU_SYSREGS instr encoding, u64)

    def reg(self, reg: int | str) -> int | None:
        reg_id = CORE_REGS[reg] if isinstance(reg, str) else reg
        for i, value in self.regs:
            if i == reg_id:
                return int.from_bytes(value, "little")
        return None

    @property
    def mpidr(self) -> int:
        value = self.reg(MPIDR_EL1)
        assert value is not None  # from_wire and save both insist on it
        return value

    def to_wire(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "mp_state": self.mp_state,
            "events": self.events,
            "regs": [[i, v] for i, v in self.regs],
            "redist": [[o, v] for o, v in self.redist],
            "icc": [[r, v] for r, v in self.icc],
        }

    @classmethod
    def from_wire(cls, d: object, where: str) -> Arm64VcpuState:
        m = _mapping(d, where, _VCPU_KEYS)
        mp_state = _int(m, "mp_state", where, 0, (1 << 32) - 1)
        if mp_state not in ARM64_MP_STATES:
            raise _error(where, "mp_state", f"{mp_state} is not an arm64 KVM_MP_STATE_* value")
        events = _bytes(m, "events", where)
        if len(events) != EVENTS_BYTES:
            raise _error(
                where,
                "events",
                f"{len(events)} bytes, expected {EVENTS_BYTES} (struct kvm_vcpu_events)",
            )
        regs: list[tuple[int, bytes]] = []
        seen: set[int] = set()
        for i, pair in enumerate(_list(m, "regs", where, MAX_REGS)):
            here = f"{where}.regs[{i}]"
            reg_id, value = _pair(pair, here)
            reg_id = _int_value(reg_id, here + "[0]", 0, (1 << 64) - 1)
            if reg_id & uapi.KVM_REG_ARCH_MASK != uapi.KVM_REG_ARM64:
                raise StateFormatError(f"arm64 state: {here}: {reg_id:#x} is no arm64 register id")
            size = reg_size(reg_id)
            data = _bytes_value(value, here + "[1]")
            if size > MAX_REG_BYTES or len(data) != size:
                raise StateFormatError(
                    f"arm64 state: {here}: {reg_name(reg_id)} has {len(data)} bytes, its id says {size}"
                )
            if reg_id in seen:
                raise StateFormatError(f"arm64 state: {here}: {reg_name(reg_id)} appears twice")
            seen.add(reg_id)
            regs.append((reg_id, data))
        if MPIDR_EL1 not in seen:
            raise _error(where, "regs", "MPIDR_EL1 is missing (it names the redistributor)")
        redist = _pairs(m, "redist", where, frozenset(redist_restore_order()), 32, exact=True)
        icc = _pairs(m, "icc", where, frozenset(ICC_NAMES), 64, exact=False)
        ctlr = dict(icc).get(ICC_CTLR_EL1)
        if ctlr is None or set(dict(icc)) != set(icc_restore_order(ctlr)):
            raise _error(where, "icc", "not the CPU interface registers its ICC_CTLR_EL1 implies")
        return cls(
            index=_int(m, "index", where, 0, MAX_VCPUS - 1),
            mp_state=mp_state,
            events=events,
            regs=tuple(regs),
            redist=redist,
            icc=icc,
        )


@dataclass(frozen=True)
class Arm64MachineState:
    """The whole arm64 machine: vCPUs, vGIC v3 (distributor, line levels) and ITS registers.

    The tables the vGIC keeps in guest RAM (LPI pending tables; ITS device, collection and
    interrupt translation tables) travel with the memory: `save_its_tables` writes them.
    """

    target: int  # KVM_ARM_VCPU_INIT target
    features: int  # KVM_ARM_VCPU_INIT features[0], without POWER_OFF
    nr_irqs: int
    gicd_base: int
    gicr_base: int
    its_base: int  # 0: the VM has no ITS
    vcpus: tuple[Arm64VcpuState, ...]
    dist: Pairs  # (GICD offset, u32)
    line_levels: Pairs  # (vINTID, a multiple of 32 from 32; u32 bitmap) for the SPIs
    its: Pairs  # (GITS offset, u64); () without an ITS
    timings: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_its(self) -> bool:
        return bool(self.its)

    def to_wire(self) -> dict[str, Any]:
        return {
            **_W.header(),
            "arch": "aarch64",
            "target": self.target,
            "features": self.features,
            "nr_irqs": self.nr_irqs,
            "gicd_base": self.gicd_base,
            "gicr_base": self.gicr_base,
            "its_base": self.its_base,
            "vcpus": [v.to_wire() for v in self.vcpus],
            "dist": [[o, v] for o, v in self.dist],
            "line_levels": [[i, v] for i, v in self.line_levels],
            "its": [[o, v] for o, v in self.its],
        }

    @classmethod
    def from_wire(cls, d: object) -> Arm64MachineState:
        _W.read_header(d)
        m = _mapping(d, "", _VM_KEYS)
        if m["arch"] != "aarch64":
            raise _error("", "arch", f"{m['arch']!r}: this is the arm64 state reader")
        nr_irqs = _int(m, "nr_irqs", "", MIN_NR_IRQS, MAX_NR_IRQS)
        if nr_irqs % 32:
            raise _error("", "nr_irqs", f"{nr_irqs} is not a multiple of 32")
        vcpus = _W.vcpus(m, MAX_VCPUS, Arm64VcpuState.from_wire)
        its_base = _int(m, "its_base", "", 0, (1 << 52) - 1)
        its = _pairs(m, "its", "", ITS_SAVED, 64, exact=bool(its_base))
        if bool(its) != bool(its_base):
            raise _error("", "its", "ITS registers and its_base disagree on whether there is an ITS")
        levels = _pairs(m, "line_levels", "", frozenset(range(32, nr_irqs, 32)), 32, exact=True)
        return cls(
            target=_int(m, "target", "", 0, (1 << 32) - 1),
            features=_int(m, "features", "", 0, (1 << 32) - 1),
            nr_irqs=nr_irqs,
            gicd_base=_int(m, "gicd_base", "", 0, (1 << 52) - 1),
            gicr_base=_int(m, "gicr_base", "", 0, (1 << 52) - 1),
            its_base=its_base,
            vcpus=vcpus,
            dist=_pairs(m, "dist", "", frozenset(dist_restore_order(nr_irqs)), 32, exact=True),
            line_levels=levels,
            its=its,
        )


ARM64_MP_STATES = frozenset({uapi.KVM_MP_STATE_RUNNABLE, uapi.KVM_MP_STATE_STOPPED, uapi.KVM_MP_STATE_SUSPENDED})
EVENTS_BYTES = ctypes.sizeof(arm_uapi.kvm_vcpu_events_arm64)
_VCPU_KEYS = frozenset("index mp_state events regs redist icc".split())
_VM_KEYS = frozenset(
    "version arch target features nr_irqs gicd_base gicr_base its_base vcpus dist line_levels its".split()
)


# ---- wire validation helpers ----------------------------------------------------------------


def _pair(value: object, path: str) -> tuple[object, object]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise StateFormatError(f"arm64 state: {path}: expected a [key, value] pair")
    return value[0], value[1]


def _pairs(m: Mapping[str, Any], key: str, where: str, allowed: frozenset[int], bits: int, exact: bool) -> Pairs:
    """(register, value) pairs: registers from `allowed`, each once (all of them if `exact`)."""
    path = f"{where}.{key}" if where else key
    pairs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for i, pair in enumerate(_list(m, key, where, len(allowed))):
        here = f"{path}[{i}]"
        reg, value = _pair(pair, here)
        reg = _int_value(reg, here + "[0]", 0, (1 << 64) - 1)
        if reg not in allowed:
            raise StateFormatError(f"arm64 state: {here}: {reg:#x} is not a register saved here")
        if reg in seen:
            raise StateFormatError(f"arm64 state: {here}: {reg:#x} appears twice")
        seen.add(reg)
        pairs.append((reg, _int_value(value, here + "[1]", 0, (1 << bits) - 1)))
    if exact and seen != allowed:
        missing = sorted(allowed - seen)
        raise StateFormatError(f"arm64 state: {path}: {len(missing)} register(s) missing, the first {missing[0]:#x}")
    return tuple(pairs)


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def save_vcpu_registers(vcpu: Vcpu) -> tuple[tuple[int, bytes], ...]:
    """Every register KVM_GET_REG_LIST names (core, FP/SIMD, system, timer, firmware)."""
    return tuple((reg_id, get_one_reg(vcpu, reg_id)) for reg_id in reg_list(vcpu))


def _get_mp_state(vcpu: Vcpu) -> int:
    mp = uapi.kvm_mp_state()
    vcpu.ioctl("KVM_GET_MP_STATE", uapi.KVM_GET_MP_STATE, mp)
    return int(mp.mp_state)


def _redist_name(offset: int) -> str:
    return f"GICR+{offset:#x}"


def save_vcpu_state(vm: Vm, vcpu: Vcpu) -> Arm64VcpuState:
    """One vCPU: registers, MP_STATE, VCPU_EVENTS, its redistributor and CPU interface."""
    _require_parked([vcpu], "saving")
    vgic = vgic_device(vm)
    regs = save_vcpu_registers(vcpu)
    if MPIDR_EL1 not in dict(regs):
        raise StateError(f"vCPU {vcpu.index}: KVM_GET_REG_LIST does not list MPIDR_EL1")
    mpidr_el1 = int.from_bytes(dict(regs)[MPIDR_EL1], "little")
    events = arm_uapi.kvm_vcpu_events_arm64()
    vcpu.ioctl("KVM_GET_VCPU_EVENTS", uapi.KVM_GET_VCPU_EVENTS, events)
    redist = tuple(
        (
            offset,
            vgic.get(
                f"GRP_REDIST_REGS vCPU {vcpu.index} {_redist_name(offset)}",
                arm_uapi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                cpu_attr(mpidr_el1, offset),
                bits=32,
            ),
        )
        for offset in redist_restore_order()
    )

    def icc(reg: int) -> int:
        return vgic.get(
            f"GRP_CPU_SYSREGS vCPU {vcpu.index} {ICC_NAMES[reg]}",
            arm_uapi.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            cpu_attr(mpidr_el1, reg),
        )

    ctlr = icc(ICC_CTLR_EL1)
    icc_regs = tuple((reg, ctlr if reg == ICC_CTLR_EL1 else icc(reg)) for reg in icc_restore_order(ctlr))
    return Arm64VcpuState(
        index=vcpu.index,
        mp_state=_get_mp_state(vcpu),
        events=bytes(events),
        regs=regs,
        redist=redist,
        icc=icc_regs,
    )


def save_vm_state(vm: Vm) -> Arm64MachineState:
    """The whole machine, registers only; every vCPU parked (`vm.pause()`) or not started.

    This writes no guest RAM. The tables the vGIC keeps in guest RAM are written by
    `save_its_tables`, which the migration calls at R6.3 (before KVM_GET_DIRTY_LOG).
    """
    times = StepTimes()
    start = time.perf_counter()
    _require_parked(vm.vcpus, "saving")
    arm = machine(vm)
    if not vm.vcpus:
        raise StateError("the VM has no vCPUs to save")
    vgic = vgic_device(vm)
    vcpus = []
    for vcpu in vm.vcpus:
        with times.step("vcpus"):
            vcpus.append(save_vcpu_state(vm, vcpu))
    with times.step("distributor"):
        dist = tuple(
            (
                offset,
                vgic.get(
                    f"GRP_DIST_REGS GICD+{offset:#x}",
                    arm_uapi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
                    offset,
                    bits=32,
                ),
            )
            for offset in dist_restore_order(arm.nr_irqs)
        )
        levels = tuple(
            (
                intid,
                vgic.get(
                    f"GRP_LEVEL_INFO {intid}",
                    arm_uapi.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                    _level_attr(vcpus[0].mpidr, intid),
                    bits=32,
                ),
            )
            for intid in range(32, arm.nr_irqs, 32)
        )
    its: Pairs = ()
    its_base = 0
    if arm.its is not None:
        with times.step("its"):
            base = its_address(vm)
            if base is None:
                raise StateError("the ITS has no base address: nothing a guest could have used")
            its_base = base
            its = tuple(
                (
                    reg,
                    arm.its.get(f"GRP_ITS_REGS {ITS_NAMES[reg]}", arm_uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS, reg),
                )
                for reg in (*ITS_REGS_BEFORE_TABLES, GITS_CTLR)
            )
    times.seconds["total"] = time.perf_counter() - start
    return Arm64MachineState(
        target=arm.target,
        features=arm.features,
        nr_irqs=arm.nr_irqs,
        gicd_base=GICD_BASE,
        gicr_base=GICR_BASE,
        its_base=its_base,
        vcpus=tuple(vcpus),
        dist=dist,
        line_levels=levels,
        its=its,
        timings=dict(times.seconds),
    )


def _level_attr(mpidr_el1: int, intid: int) -> int:
    # arm-vgic-v3.rst KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO: "| mpidr | info | vINTID |" with
    # VGIC_LEVEL_INFO_LINE_LEVEL: "Get/Set the input level of the IRQ line for a set of 32
    # contiguously numbered interrupts. vINTID must be a multiple of 32." SPIs are "reported
    # with the same value regardless of the mpidr specified" (one that names a vCPU).
    info = arm_uapi.VGIC_LEVEL_INFO_LINE_LEVEL << arm_uapi.KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT
    return cpu_attr(mpidr_el1, info | intid)


# --------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------
def check_compatible(vm: Vm, state: Arm64MachineState) -> None:
    """Refuse, with the reason, a state that cannot be restored into `vm`."""
    arm = machine(vm)
    if len(vm.vcpus) != len(state.vcpus):
        raise IncompatibleStateError(f"the state has {len(state.vcpus)} vCPU(s); the target VM has {len(vm.vcpus)}")
    if (arm.target, arm.features) != (state.target, state.features):
        raise IncompatibleStateError(
            f"the VM's vCPUs were initialized as target {state.target} with features "
            f"{state.features:#x}; this host's KVM gives target {arm.target}, features "
            f"{arm.features:#x}: another CPU type"
        )
    if arm.nr_irqs != state.nr_irqs:
        raise IncompatibleStateError(
            f"the VM's vGIC has {state.nr_irqs} interrupts, the target's {arm.nr_irqs} (fixed at its CTRL_INIT)"
        )
    if (state.gicd_base, state.gicr_base) != (GICD_BASE, GICR_BASE):
        raise IncompatibleStateError(
            f"the VM's GIC sits at {state.gicd_base:#x}/{state.gicr_base:#x}, this "
            f"migrated's at {GICD_BASE:#x}/{GICR_BASE:#x}"
        )
    if state.has_its != (arm.its is not None):
        raise IncompatibleStateError(
            "the source VM "
            + ("had" if state.has_its else "had no")
            + " ITS; the target "
            + ("has" if arm.its is not None else "has none")
        )
    for vcpu, saved in zip(vm.vcpus, state.vcpus):
        known = set(reg_list(vcpu))
        unknown = [reg_id for reg_id, _ in saved.regs if reg_id not in known]
        if unknown:
            raise IncompatibleStateError(
                f"vCPU {vcpu.index}: {len(unknown)} register(s) of the VM are unknown to this "
                "host's KVM: " + ", ".join(reg_name(r) for r in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            )


# --------------------------------------------------------------------------------------------
# Restore (DESIGN R9; arm-vgic-its.rst "ITS Restore Sequence")
# --------------------------------------------------------------------------------------------
def restore_vcpu_registers(vcpu: Vcpu, state: Arm64VcpuState) -> None:
    """ONE_REG values in KVM_GET_REG_LIST order, then MP_STATE and VCPU_EVENTS."""
    for reg_id, value in state.regs:
        set_one_reg(vcpu, reg_id, value)
    # api.rst 4.39 KVM_SET_MP_STATE, arm64: "The only states that are valid are
    # KVM_MP_STATE_STOPPED and KVM_MP_STATE_RUNNABLE which reflect if the vcpu should be paused
    # or not." (A powered-off secondary is STOPPED; PSCI CPU_ON makes it RUNNABLE.)
    mp = uapi.kvm_mp_state(mp_state=state.mp_state)
    vcpu.ioctl("KVM_SET_MP_STATE", uapi.KVM_SET_MP_STATE, mp)
    events = arm_uapi.kvm_vcpu_events_arm64.from_buffer_copy(state.events)
    vcpu.ioctl("KVM_SET_VCPU_EVENTS", uapi.KVM_SET_VCPU_EVENTS, events)


def _restore_dist(vgic: Device, state: Arm64MachineState) -> None:
    values = dict(state.dist)
    grp = arm_uapi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS
    levels_after = spi_words(GICD_ICFGR, state.nr_irqs, 2)[-1]
    for offset in dist_restore_order(state.nr_irqs):
        value = values[offset]
        clear = dist_clear_twin(offset)
        if clear is not None:
            vgic.set(f"GRP_DIST_REGS GICD+{clear:#x}", grp, clear, ~value & 0xFFFF_FFFF, bits=32)
        vgic.set(f"GRP_DIST_REGS GICD+{offset:#x}", grp, offset, value, bits=32)
        if offset == levels_after:
            # The SPIs' input levels, once their trigger configuration (ICFGR) is in place and
            # before pending state: for a level-triggered SPI, pending is latch OR level.
            for intid, level in state.line_levels:
                vgic.set(
                    f"GRP_LEVEL_INFO {intid}",
                    arm_uapi.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                    _level_attr(state.vcpus[0].mpidr, intid),
                    level,
                    bits=32,
                )


def _restore_redist(vgic: Device, state: Arm64VcpuState) -> None:
    values = dict(state.redist)
    grp = arm_uapi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS
    for offset in redist_restore_order():
        value = values[offset]
        clear = CLEAR_TWIN.get(offset)
        where = f"GRP_REDIST_REGS vCPU {state.index}"
        if clear is not None:
            vgic.set(
                f"{where} {_redist_name(clear)}",
                grp,
                cpu_attr(state.mpidr, clear),
                ~value & 0xFFFF_FFFF,
                bits=32,
            )
        vgic.set(f"{where} {_redist_name(offset)}", grp, cpu_attr(state.mpidr, offset), value, bits=32)


def _restore_icc(vgic: Device, state: Arm64VcpuState) -> None:
    values = dict(state.icc)
    for reg in icc_restore_order(values[ICC_CTLR_EL1]):
        vgic.set(
            f"GRP_CPU_SYSREGS vCPU {state.index} {ICC_NAMES[reg]}",
            arm_uapi.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            cpu_attr(state.mpidr, reg),
            values[reg],
        )


def restore_vm_state(vm: Vm, state: Arm64MachineState, *, check: bool = True) -> RestoreReport:
    """Write the whole machine's state into `vm`, built like the source and never run.

    Guest RAM must be in place first (R9): enabling LPIs reads the pending tables and
    ITS_RESTORE_TABLES reads the ITS tables from it. The vGIC is initialized already
    (`create_vgic` ran CTRL_INIT, which register access needs: KVM answers EBUSY before it).

    The order, after arm-vgic-its.rst's "ITS Restore Sequence" ("a) restore all guest memory
    and create vcpus b) restore all redistributors c) provide the ITS base address
    (KVM_DEV_ARM_VGIC_GRP_ADDR) d) restore the ITS in the following order: 1. Restore
    GITS_CBASER 2. Restore all other GITS_ registers, except GITS_CTLR! 3. Load the ITS table
    data (KVM_DEV_ARM_ITS_RESTORE_TABLES) 4. Restore GITS_CTLR. Then vcpus can be started.")
    and its requirement "The GICV3 must be restored before the ITS":

      1. every vCPU: ONE_REG registers (MPIDR_EL1 among them, which the redistributors are
         addressed by), MP_STATE, VCPU_EVENTS;
      2. the distributor, GICD_IIDR first ("Userspace should set GICD_IIDR before setting any
         other registers"), GICD_CTLR last; the SPIs' line levels after their configuration;
      3. every redistributor (PROPBASER, PENDBASER, SGI/PPI state, GICR_CTLR last);
      4. every CPU interface (ICC_*_EL1);
      5. the ITS base address: set here if the target's ITS was created without one
         (`create_its(vm, address=None)`), else checked to be the saved one. What step c)
         guarantees is that the address precedes the ITS registers (KVM answers ENXIO to
         GRP_ITS_REGS until it is set); `Vm.create` sets it at creation, earlier still;
      6. GITS_CBASER, GITS_IIDR, GITS_CREADR, GITS_CWRITER, GITS_BASER0..7;
      7. KVM_DEV_ARM_ITS_RESTORE_TABLES;
      8. GITS_CTLR.
    """
    times = StepTimes()
    start = time.perf_counter()
    _require_parked(vm.vcpus, "restoring")
    machine(vm)
    if check:
        with times.step("check"):
            check_compatible(vm, state)
    vgic = vgic_device(vm)
    with times.step("vcpus"):
        for vcpu, vcpu_state in zip(vm.vcpus, state.vcpus):
            restore_vcpu_registers(vcpu, vcpu_state)
    with times.step("distributor"):
        _restore_dist(vgic, state)
    with times.step("redistributors"):
        for vcpu_state in state.vcpus:
            _restore_redist(vgic, vcpu_state)
    with times.step("cpu_interfaces"):
        for vcpu_state in state.vcpus:
            _restore_icc(vgic, vcpu_state)
    if state.has_its:
        its = its_device(vm)
        with times.step("its"):
            here = its_address(vm)
            if here is None:
                set_its_address(vm, state.its_base)
            elif here != state.its_base:
                raise IncompatibleStateError(
                    f"the ITS sits at {state.its_base:#x} in the state, at {here:#x} in the target"
                )
            values = dict(state.its)
            grp = arm_uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS
            for reg in ITS_REGS_BEFORE_TABLES:
                its.set(f"GRP_ITS_REGS {ITS_NAMES[reg]}", grp, reg, values[reg])
            # "KVM_DEV_ARM_ITS_RESTORE_TABLES restore the ITS tables from guest RAM to ITS
            # internal structures. The GICV3 must be restored before the ITS and all ITS
            # registers but the GITS_CTLR must be restored before restoring the ITS tables."
            its.ctrl("ITS_RESTORE_TABLES", arm_uapi.KVM_DEV_ARM_ITS_RESTORE_TABLES)
            its.set("GRP_ITS_REGS GITS_CTLR", grp, GITS_CTLR, values[GITS_CTLR])
    times.seconds["total"] = time.perf_counter() - start
    return RestoreReport(timings=dict(times.seconds))
