"""The arm64 workload guest, VMM side: layout, parameters, loading, and a view of its state.

The guest (sources in `aarch64/`, image `workload-aarch64.bin`) is the x86 workload guest's loop
on arm64 at EL1, with the same parameter page, status page, generation array and page format
(`abi.py`, `pages.py`), plus arm64 words from 32 up (`WLA_*` below, mirrored from
`aarch64/abi_aarch64.h` and checked by a test). vCPU 0 also programs the vGIC's ITS from inside
the guest and then drives LPIs through it; the ITS tables it leaves in guest RAM are what
`KVM_DEV_ARM_ITS_SAVE_TABLES` writes when the VM is saved.

Guest-physical memory (RAM starts at `RAM_BASE`; offsets from there; everything is fixed except
the generation array and the working set):

    +0x000000  code, linked here (CODE_MAX), with its identity map (a level-1 table)
    +0x040000  parameter page
    +0x041000  status pages, one per vCPU (MAX_VCPUS)
    +0x100000  stacks, 16 KiB per vCPU (MAX_VCPUS)
    +0x200000  ITS device table      64 KiB  (GITS_BASER: KVM's page size is 64 KiB)
    +0x210000  ITS collection table  64 KiB
    +0x220000  ITS command queue      4 KiB  (GITS_CBASER: 64 KiB aligned under KVM)
    +0x221000  ITT of the device      4 KiB  (MAPD)
    +0x222000  LPI configuration      8 KiB  (GICR_PROPBASER, INTIDs below 16384)
    +0x230000  vCPU 0's LPI pending table (GICR_PENDBASER, 64 KiB aligned, 2 KiB used)
    +0x240000  u32 generation per working-set page
    2 MiB up   the working set, 2 MiB aligned, up to the end of RAM

The guest owns the LPI configuration table and the command queue (it writes GITS_CWRITER);
KVM owns the device, collection and interrupt translation tables and the pending table once the
guest has programmed them, and writes them only on KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES and
KVM_DEV_ARM_ITS_SAVE_TABLES (`aarch64.save_its_tables`, R6.3): with no vCPU running, so those
pages reach the backup bitmap (R6.4), never a dirty ring. `hold_lpis` keeps LPIs pending, so a
save has pending bits to write; `set_lpi_rate` paces vCPU 0's INT commands (0 stops them).

Every write into guest RAM goes through the caller's `write` (DESIGN R5). Arrays named `ram` are
`Vm.ram`: the memfd, whose byte 0 is guest-physical `RAM_BASE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt

from migrated.kvm.arch import aarch64 as arm
from migrated.kvm import uapi

from .. import abi
from ..image import AARCH64_WORKLOAD, GuestImage
from ..layout import MAX_VCPUS, WorkingSetGeometry, WorkloadLayout, check_sizes
from ..guest_ram import Write
from ..pages import VerifyReport, verify_pages
from ..workload import (
    common_params_words,
    MIB,
    VcpuStatus,
    GuestView,
    WorkloadParams,
    shared_status,
)

if TYPE_CHECKING:
    from migrated.kvm.vcpu import Vcpu
    from migrated.kvm.vm import Vm

SOURCE_DIR = Path(__file__).resolve().parent / "aarch64"

# ---- the contract, arm64 part: mirrors aarch64/abi_aarch64.h (tested) ----------------------

WLA_VERSION = 1
WLA_FIRST_WORD = 32

WLA_P_VERSION = 32
WLA_P_FEATURES = 33
WLA_P_STACK_BASE = 34
WLA_P_STACK_SIZE = 35
WLA_P_GICD_BASE = 36
WLA_P_GICR_BASE = 37
WLA_P_ITS_BASE = 38
WLA_P_ITS_DEVICE_TABLE = 39
WLA_P_ITS_COLL_TABLE = 40
WLA_P_ITS_CMDQ = 41
WLA_P_ITS_ITT = 42
WLA_P_LPI_PROP = 43
WLA_P_LPI_PEND = 44
WLA_P_ITS_DEVICE_ID = 45
WLA_P_LPI_RATE = 46
WLA_P_LPI_HOLD = 47

WLA_F_ITS = 1

WLA_S_VERSION = 32
WLA_S_COUNTER_HZ = 33
WLA_S_MPIDR = 34
WLA_S_ITS_STATE = 35
WLA_S_ITS_ERROR = 36
WLA_S_ITS_DETAIL = 37
WLA_S_REDIST = 38
WLA_S_ITS_COMMANDS = 39
WLA_S_LPIS_EXPECTED = 40
WLA_S_LPIS_RECEIVED = 41
WLA_S_LPIS_UNEXPECTED = 42
WLA_S_MSIS_RECEIVED = 43
WLA_S_LPI_OUTSTANDING = 44
WLA_S_LPI_STALLS = 45
WLA_S_LAST_INTID = 46
WLA_S_LPI_RATE_SEEN = 47
WLA_S_FAULT_ESR = 48
WLA_S_FAULT_ELR = 49
WLA_S_FAULT_FAR = 50
WLA_S_FAULT_VECTOR = 51
WLA_S_ITS_CREADR = 52

WLA_STATE_FAULT = 16

WLA_ITS_OFF = 0
WLA_ITS_PROGRAMMING = 1
WLA_ITS_READY = 2
WLA_ITS_FAILED = 3

WLA_ERR_NONE = 0
WLA_ERR_NO_REDIST = 1
WLA_ERR_NO_PLPIS = 2
WLA_ERR_LPIS_ENABLED = 3
WLA_ERR_PROPBASER = 4
WLA_ERR_PENDBASER = 5
WLA_ERR_ITS_TYPER = 6
WLA_ERR_ITS_ENABLED = 7
WLA_ERR_BASER = 8
WLA_ERR_NO_TABLE = 9
WLA_ERR_CBASER = 10
WLA_ERR_ITS_ENABLE = 11
WLA_ERR_CMD_TIMEOUT = 12
WLA_ERR_RWP = 13
WLA_ERR_WAKER = 14

WLA_EVENT_BITS = 5
WLA_EVENTS = 32
WLA_INT_EVENTS = 16
WLA_LPI_BASE = 8192
WLA_LPI_ID_BITS = 14
WLA_LPI_PRIORITY = 0xA0
WLA_ICID = 0


def constants() -> dict[str, int]:
    """Every `WLA_*` constant, by its C name."""
    return {k: v for k, v in globals().items() if k.startswith("WLA_") and isinstance(v, int)}


ITS_STATES = {
    WLA_ITS_OFF: "off",
    WLA_ITS_PROGRAMMING: "programming",
    WLA_ITS_READY: "ready",
    WLA_ITS_FAILED: "failed",
}
ITS_ERRORS = {
    WLA_ERR_NONE: "none",
    WLA_ERR_NO_REDIST: "no redistributor matches MPIDR_EL1",
    WLA_ERR_NO_PLPIS: "redistributor without LPIs (GICR_TYPER.PLPIS = 0)",
    WLA_ERR_LPIS_ENABLED: "GICR_CTLR.EnableLPIs already set",
    WLA_ERR_PROPBASER: "GICR_PROPBASER did not take the configuration table",
    WLA_ERR_PENDBASER: "GICR_PENDBASER did not take the pending table",
    WLA_ERR_ITS_TYPER: "GITS_TYPER: no physical LPIs, or too few device/event id bits",
    WLA_ERR_ITS_ENABLED: "GITS_CTLR.Enabled already set",
    WLA_ERR_BASER: "a GITS_BASER<n> did not take its table",
    WLA_ERR_NO_TABLE: "no GITS_BASER<n> of type Devices or Collections",
    WLA_ERR_CBASER: "GITS_CBASER did not take the command queue",
    WLA_ERR_ITS_ENABLE: "GITS_CTLR.Enabled did not stick",
    WLA_ERR_CMD_TIMEOUT: "GITS_CREADR did not reach GITS_CWRITER",
    WLA_ERR_RWP: "GICD_CTLR.RWP or GICR_CTLR.RWP stayed set",
    WLA_ERR_WAKER: "GICR_WAKER.ChildrenAsleep stayed set",
}

# ---- where things are ------------------------------------------------------------------------

PAGE_SIZE = abi.WL_PAGE_SIZE
GIB = 1 << 30
KIB64 = 0x10000
HUGE_PAGE = 2 * MIB

# The fixed guest-physical map of the vGIC and RAM, where migrated/kvm/arch/aarch64/devices.py puts them.
RAM_BASE = arm.RAM_BASE
GICD_BASE = arm.GICD_BASE
GICR_BASE = arm.GICR_BASE
ITS_BASE = arm.ITS_BASE

# The guest's identity map covers [0, 512 GiB): RAM from 1 GiB up to there.
MAX_MEMORY = 512 * GIB - RAM_BASE

# Keep in step with aarch64/workload.ld (a test checks).
CODE_GPA = RAM_BASE
CODE_MAX = 0x40000
PARAMS_OFFSET = 0x40000
STATUS_OFFSET = 0x41000
STACKS_OFFSET = 0x100000
STACK_SIZE = 16 << 10
ITS_OFFSET = 0x200000
ITS_DEVICE_TABLE_OFFSET = ITS_OFFSET
ITS_COLL_TABLE_OFFSET = ITS_OFFSET + 0x10000
ITS_CMDQ_OFFSET = ITS_OFFSET + 0x20000
ITS_ITT_OFFSET = ITS_OFFSET + 0x21000
LPI_PROP_OFFSET = ITS_OFFSET + 0x22000
LPI_PEND_OFFSET = ITS_OFFSET + 0x30000
GEN_OFFSET = ITS_OFFSET + 0x40000

ITS_TABLE_BYTES = KIB64
ITS_CMDQ_BYTES = 0x1000
ITS_ITT_BYTES = 0x1000
LPI_PROP_BYTES = (1 << WLA_LPI_ID_BITS) - 8192
LPI_PEND_BYTES = (1 << WLA_LPI_ID_BITS) // 8

DEFAULT_DEVICE_ID = 0x20
DEFAULT_LPI_RATE_HZ = 1000.0

# EL1h (SPSel = 1, M[3:0] = 0b0101) with D, A, I and F masked: the state KVM resets a vCPU to.
PSTATE_EL1H_DAIF_MASKED = 0x3C5

assert PARAMS_OFFSET >= CODE_MAX and STATUS_OFFSET >= PARAMS_OFFSET + PAGE_SIZE
assert STATUS_OFFSET + MAX_VCPUS * PAGE_SIZE <= STACKS_OFFSET
assert STACKS_OFFSET + MAX_VCPUS * STACK_SIZE <= ITS_OFFSET
assert ITS_CMDQ_OFFSET % KIB64 == 0 and LPI_PEND_OFFSET % KIB64 == 0
assert LPI_PROP_OFFSET + LPI_PROP_BYTES <= LPI_PEND_OFFSET
assert LPI_PEND_OFFSET + KIB64 <= GEN_OFFSET


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


@dataclass(frozen=True)
class Arm64Layout(WorkingSetGeometry):
    """Guest-physical addresses of everything; the working-set part reads like WorkloadLayout's
    (so `pages.verify_pages` checks it as it checks the x86 guest)."""

    ram_base: int
    memory_bytes: int
    vcpus: int
    code: int
    code_max: int
    entry: int
    params: int
    status: int  # vCPU i's status page at status + i * PAGE_SIZE
    stacks: int  # vCPU i's stack: [stacks + i * stack_size, + stack_size)
    stack_size: int
    its_device_table: int
    its_collection_table: int
    its_cmdq: int
    its_itt: int
    lpi_prop: int
    lpi_pend: int
    gen: int  # u32 generation per working-set page, by global page index
    gen_bytes: int
    metadata_end: int
    ws_base: int
    ws_pages: int

    @property
    def ram_end(self) -> int:
        return self.ram_base + self.memory_bytes

    def kvm_written_tables(self) -> dict[str, tuple[int, int]]:
        """(GPA, bytes) of what KVM writes while saving: SAVE_PENDING_TABLES and ITS_SAVE_TABLES."""
        return {
            "its device table": (self.its_device_table, ITS_TABLE_BYTES),
            "its collection table": (self.its_collection_table, ITS_TABLE_BYTES),
            "itt": (self.its_itt, ITS_ITT_BYTES),
            "lpi pending table": (self.lpi_pend, LPI_PEND_BYTES),
        }

    def describe(self) -> dict[str, str]:
        """Human-readable GPA ranges, for logs and reports."""

        def span(start: int, size: int) -> str:
            return f"{start:#x}-{start + size:#x}"

        return {
            "code": span(self.code, self.code_max),
            "params": span(self.params, PAGE_SIZE),
            "status": span(self.status, self.vcpus * PAGE_SIZE),
            "stacks": span(self.stacks, self.vcpus * self.stack_size),
            "its device table": span(self.its_device_table, ITS_TABLE_BYTES),
            "its collection table": span(self.its_collection_table, ITS_TABLE_BYTES),
            "its command queue": span(self.its_cmdq, ITS_CMDQ_BYTES),
            "itt": span(self.its_itt, ITS_ITT_BYTES),
            "lpi configuration table": span(self.lpi_prop, LPI_PROP_BYTES),
            "lpi pending table": span(self.lpi_pend, LPI_PEND_BYTES),
            "generations": span(self.gen, self.gen_bytes),
            "working set": span(self.ws_base, self.ws_bytes),
        }


def plan_layout_aarch64(memory_bytes: int, vcpus: int, working_set_bytes: int, ram_base: int = RAM_BASE) -> Arm64Layout:
    """Places everything; raises ValueError naming what does not fit."""
    if ram_base != RAM_BASE:
        raise ValueError(f"RAM at {ram_base:#x}: the arm64 workload image is linked at {RAM_BASE:#x}")
    ws_pages = check_sizes(memory_bytes, vcpus, working_set_bytes)
    if memory_bytes > MAX_MEMORY:
        raise ValueError(
            f"memory {memory_bytes >> 20} MiB: the arm64 workload guest maps RAM up to 512 GiB "
            f"(at most {MAX_MEMORY >> 20} MiB from {ram_base:#x})"
        )
    gen = ram_base + GEN_OFFSET
    gen_bytes = _align_up(ws_pages * 4, PAGE_SIZE)
    metadata_end = gen + gen_bytes
    ws_base = _align_up(metadata_end, HUGE_PAGE)
    if ws_base + working_set_bytes > ram_base + memory_bytes:
        room = max(0, ram_base + memory_bytes - ws_base)
        raise ValueError(
            f"working set of {working_set_bytes >> 20} MiB does not fit: {memory_bytes >> 20} MiB "
            f"of RAM minus {(ws_base - ram_base) >> 20} MiB of guest metadata (code, vCPU pages "
            f"and stacks, ITS tables, generation arrays) leaves {room >> 20} MiB"
        )
    return Arm64Layout(
        ram_base=ram_base,
        memory_bytes=memory_bytes,
        vcpus=vcpus,
        code=CODE_GPA,
        code_max=CODE_MAX,
        entry=CODE_GPA,
        params=ram_base + PARAMS_OFFSET,
        status=ram_base + STATUS_OFFSET,
        stacks=ram_base + STACKS_OFFSET,
        stack_size=STACK_SIZE,
        its_device_table=ram_base + ITS_DEVICE_TABLE_OFFSET,
        its_collection_table=ram_base + ITS_COLL_TABLE_OFFSET,
        its_cmdq=ram_base + ITS_CMDQ_OFFSET,
        its_itt=ram_base + ITS_ITT_OFFSET,
        lpi_prop=ram_base + LPI_PROP_OFFSET,
        lpi_pend=ram_base + LPI_PEND_OFFSET,
        gen=gen,
        gen_bytes=gen_bytes,
        metadata_end=metadata_end,
        ws_base=ws_base,
        ws_pages=ws_pages,
    )


# ---- the image and the parameter page ---------------------------------------------------------


IMAGE: GuestImage = AARCH64_WORKLOAD  # a test points it at the image it built


@dataclass(frozen=True)
class ItsSettings:
    """What vCPU 0 does with the vGIC. `enabled=False` leaves the GIC alone (a VM without ITS)."""

    enabled: bool = True
    device_id: int = DEFAULT_DEVICE_ID
    lpi_rate_hz: float = DEFAULT_LPI_RATE_HZ  # INT commands per second; 0 = none
    gicd: int = GICD_BASE
    gicr: int = GICR_BASE
    its: int = ITS_BASE

    def __post_init__(self) -> None:
        if not 0 <= self.device_id < 1 << 16:
            raise ValueError(f"ITS device id {self.device_id}: must be below 65536 (16 id bits)")
        if (self.device_id + 1) * 8 > ITS_TABLE_BYTES:
            raise ValueError(
                f"ITS device id {self.device_id}: the 64 KiB device table holds ids below {ITS_TABLE_BYTES // 8}"
            )
        lpi_rate_word(self.lpi_rate_hz)


def lpi_rate_word(per_s: float) -> int:
    if math.isnan(per_s) or per_s < 0 or math.isinf(per_s):
        raise ValueError(f"LPI rate {per_s}/s: must be finite and >= 0")
    return 0 if per_s == 0 else max(1, round(per_s))


def params_page(layout: Arm64Layout, params: WorkloadParams, its: ItsSettings, counter_hz: int = 0) -> bytes:
    """The parameter page. `counter_hz` 0 lets the guest read CNTFRQ_EL0 itself."""
    words = common_params_words(layout, params, counter_hz)
    words[WLA_P_VERSION] = WLA_VERSION
    words[WLA_P_FEATURES] = WLA_F_ITS if its.enabled else 0
    words[WLA_P_STACK_BASE] = layout.stacks
    words[WLA_P_STACK_SIZE] = layout.stack_size
    words[WLA_P_GICD_BASE] = its.gicd
    words[WLA_P_GICR_BASE] = its.gicr
    words[WLA_P_ITS_BASE] = its.its
    words[WLA_P_ITS_DEVICE_TABLE] = layout.its_device_table
    words[WLA_P_ITS_COLL_TABLE] = layout.its_collection_table
    words[WLA_P_ITS_CMDQ] = layout.its_cmdq
    words[WLA_P_ITS_ITT] = layout.its_itt
    words[WLA_P_LPI_PROP] = layout.lpi_prop
    words[WLA_P_LPI_PEND] = layout.lpi_pend
    words[WLA_P_ITS_DEVICE_ID] = its.device_id
    words[WLA_P_LPI_RATE] = lpi_rate_word(its.lpi_rate_hz)
    return words.tobytes()


@dataclass(frozen=True)
class VcpuEntry:
    """A vCPU's start: PC at the image, X0 = vCPU index, X1 = parameter page, EL1h, DAIF masked."""

    pc: int
    x0: int
    x1: int
    pstate: int = PSTATE_EL1H_DAIF_MASKED


def install(
    write: Write,
    layout: Arm64Layout,
    params: WorkloadParams,
    its: ItsSettings = ItsSettings(),
    counter_hz: int = 0,
) -> list[VcpuEntry]:
    """Writes the image and the parameter page into zeroed RAM; returns each vCPU's start.

    RAM must be zero where the guest keeps state (status pages, ITS tables, generation arrays,
    working set), as a new VM's is: a never-written page counts as valid only when all zero, and
    the LPI pending table is declared zero (GICR_PENDBASER.PTZ).
    """
    if params.vcpus != layout.vcpus:
        raise ValueError(f"params for {params.vcpus} vCPUs, layout for {layout.vcpus}")
    if params.working_set_bytes != layout.ws_bytes:
        raise ValueError(f"params for a {params.working_set_bytes}-byte working set, layout for {layout.ws_bytes}")
    if counter_hz < 0:
        raise ValueError(f"counter frequency {counter_hz} Hz: must be >= 0 (0: CNTFRQ_EL0)")
    image = IMAGE.load()
    if len(image) > layout.code_max:
        raise ValueError(f"workload image is {len(image)} bytes; its region holds {layout.code_max}")
    write(layout.code, image)
    write(layout.params, params_page(layout, params, its, counter_hz))
    return [VcpuEntry(pc=layout.entry, x0=v, x1=layout.params) for v in range(layout.vcpus)]


# ---- on a VM ----------------------------------------------------------------------------------


def load_workload_aarch64(vm: Vm, params: WorkloadParams, its: ItsSettings = ItsSettings()) -> Arm64WorkloadGuest:
    """Install the guest into `vm` (fresh, zeroed RAM at RAM_BASE; vCPUs created and initialised
    by migrated/kvm/arch/aarch64/, not started) and point every vCPU at it through ONE_REG."""
    assert vm.memory is not None
    if params.vcpus != len(vm.vcpus):
        raise ValueError(f"workload for {params.vcpus} vCPUs on a VM with {len(vm.vcpus)}")
    regions = vm.memory.regions
    if len(regions) != 1 or regions[0].guest_phys_addr != RAM_BASE or regions[0].offset != 0:
        raise ValueError(
            f"the arm64 workload guest needs one RAM region at {RAM_BASE:#x}; this VM has "
            + ", ".join(f"{r.guest_phys_addr:#x}+{r.size:#x}" for r in regions)
        )
    layout = plan_layout_aarch64(min(vm.memory.size, MAX_MEMORY), params.vcpus, params.working_set_bytes)
    if its.enabled and arm.machine(vm).its is None:
        raise ValueError("the workload guest was asked to program an ITS this VM does not have")
    entries = install(vm.write_guest, layout, params, its)
    for vcpu, entry in zip(vm.vcpus, entries):
        start_vcpu_at(vcpu, entry)
    return Arm64WorkloadGuest(layout)


def start_vcpu_at(vcpu: Vcpu, entry: VcpuEntry) -> None:
    """PC, X0, X1 and PSTATE through KVM_SET_ONE_REG, then MP_STATE RUNNABLE.

    aarch64.py initialises secondary vCPUs powered off (KVM_ARM_VCPU_POWER_OFF), for a guest
    that starts them with PSCI CPU_ON; this guest does not, its VMM starts every vCPU itself.
    api.rst (KVM_SET_MP_STATE, arm64): "The only states that are valid are KVM_MP_STATE_STOPPED
    and KVM_MP_STATE_RUNNABLE which reflect if the vcpu is paused or not." RUNNABLE keeps the
    registers set here (a PSCI CPU_ON would reset them).
    """
    arm.set_reg(vcpu, "PC", entry.pc)
    arm.set_reg(vcpu, "X0", entry.x0)
    arm.set_reg(vcpu, "X1", entry.x1)
    arm.set_reg(vcpu, "PSTATE", entry.pstate)
    vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)


# ---- the view -------------------------------------------------------------------------------


class _GpaRam:
    """`Vm.ram` indexed by guest-physical address: `pages.verify_pages` slices RAM by GPA."""

    def __init__(self, ram: npt.NDArray[np.uint8], base: int) -> None:
        self._ram = ram
        self._base = base

    def __getitem__(self, key: slice) -> npt.NDArray[np.uint8]:
        start, stop = key.start - self._base, key.stop - self._base
        if start < 0 or stop > self._ram.size or key.step is not None:
            raise IndexError(f"guest range [{key.start:#x}, {key.stop:#x}) is outside RAM")
        return self._ram[start:stop]


@dataclass(frozen=True)
class Fault:
    esr: int
    elr: int
    far: int
    vector: int  # slot 0-15 of VBAR_EL1

    @property
    def exception_class(self) -> int:
        return self.esr >> 26 & 0x3F


@dataclass(frozen=True)
class Arm64VcpuStatus(VcpuStatus):
    counter_hz: int
    mpidr: int
    its_state: str  # off, programming, ready, failed (vCPU 0; "off" elsewhere)
    its_error: str | None
    its_detail: int
    its_commands: int
    lpis_expected: int  # INT commands the ITS consumed
    lpis_received: int  # of those, LPIs acknowledged
    lpis_unexpected: int
    msis_received: int  # LPIs of VMM-signalled events
    lpi_outstanding: int  # bitmask of events sent and not yet received
    lpi_stalls: int
    last_intid: int
    lpi_rate_seen: int
    fault: Fault | None


class Arm64WorkloadGuest(GuestView[Arm64Layout]):
    """The VMM's view of a running arm64 workload guest, through guest RAM alone (it migrates
    with it). `workload.WorkloadGuest`'s calls (rate, mode, passes: the same parameter words),
    with RAM addressed from RAM_BASE, arm64 status words, and the LPI calls."""

    def _gpa(self, ram: npt.NDArray[np.uint8]) -> _GpaRam:
        return _GpaRam(ram, self.layout.ram_base)

    def _params(self, ram: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
        return self._gpa(ram)[self.layout.params : self.layout.params + PAGE_SIZE].view(np.uint64)

    def status(self, ram: npt.NDArray[np.uint8]) -> list[Arm64VcpuStatus]:
        result = []
        gram = self._gpa(ram)
        for v in range(self.layout.vcpus):
            gpa = self.layout.status_gpa(v)
            w = [int(x) for x in gram[gpa : gpa + 8 * 64].view(np.uint64)]
            error, its_state = w[WLA_S_ITS_ERROR], w[WLA_S_ITS_STATE]
            fault = None
            if w[abi.WL_S_STATE] == WLA_STATE_FAULT:
                fault = Fault(w[WLA_S_FAULT_ESR], w[WLA_S_FAULT_ELR], w[WLA_S_FAULT_FAR], w[WLA_S_FAULT_VECTOR])
            result.append(
                Arm64VcpuStatus(
                    **shared_status(v, w, self.layout.ws_base),
                    counter_hz=w[WLA_S_COUNTER_HZ],
                    mpidr=w[WLA_S_MPIDR],
                    its_state=ITS_STATES.get(its_state, f"unknown {its_state}"),
                    its_error=None if error == WLA_ERR_NONE else ITS_ERRORS.get(error, str(error)),
                    its_detail=w[WLA_S_ITS_DETAIL],
                    its_commands=w[WLA_S_ITS_COMMANDS],
                    lpis_expected=w[WLA_S_LPIS_EXPECTED],
                    lpis_received=w[WLA_S_LPIS_RECEIVED],
                    lpis_unexpected=w[WLA_S_LPIS_UNEXPECTED],
                    msis_received=w[WLA_S_MSIS_RECEIVED],
                    lpi_outstanding=w[WLA_S_LPI_OUTSTANDING],
                    lpi_stalls=w[WLA_S_LPI_STALLS],
                    last_intid=w[WLA_S_LAST_INTID],
                    lpi_rate_seen=w[WLA_S_LPI_RATE_SEEN],
                    fault=fault,
                )
            )
        return result

    def set_lpi_rate(self, write: Write, per_s: float) -> None:
        """INT commands per second from vCPU 0 (0 stops them; the guest applies it live)."""
        self._set_param(write, WLA_P_LPI_RATE, lpi_rate_word(per_s))

    def hold_lpis(self, write: Write, hold: bool) -> None:
        """While held, vCPU 0 acknowledges no LPI: they stay pending (a save writes them into
        the LPI pending table); released, it takes them all."""
        self._set_param(write, WLA_P_LPI_HOLD, int(hold))

    def its_device_id(self, ram: npt.NDArray[np.uint8]) -> int:
        return int(self._params(ram)[WLA_P_ITS_DEVICE_ID])

    def verify(self, ram: npt.NDArray[np.uint8], *, pattern: bool = True) -> VerifyReport:
        """The working set against its headers and the generation array (vCPUs stopped)."""
        # verify_pages reads only the working-set attributes, which Arm64Layout shares with
        # WorkloadLayout, and slices RAM by GPA, which _GpaRam provides.
        return verify_pages(
            cast("npt.NDArray[np.uint8]", self._gpa(ram)),
            cast(WorkloadLayout, self.layout),
            pattern=pattern,
        )

    def pages_of(self, name: str) -> tuple[int, ...]:
        """RAM page offsets (memslot page numbers) of one of `kvm_written_tables()`."""
        gpa, size = self.layout.kvm_written_tables()[name]
        first = (gpa - self.layout.ram_base) // PAGE_SIZE
        return tuple(range(first, first + -(-size // PAGE_SIZE)))
