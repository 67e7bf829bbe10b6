"""The x86_64 workload guest, VMM side: parameters, installation, and a view of its state.

`install()` writes the image, the long-mode tables and the parameter page into a fresh (zeroed)
VM's RAM and returns each vCPU's registers; `WorkloadGuest` reads the status pages, changes the
rate and mode live, requests passes, and checks the working set (`verify_pages`). Every write into
guest RAM goes through the caller's `write` (DESIGN R5); reading `ram` directly is fine.

Rates: `dirty_rate_mib_s` is the whole VM's, split evenly across the vCPUs (the guest rate-limits
each vCPU in pages/s with its TSC). Passes: each request makes every vCPU rewrite every page of its
share exactly once (the seed only varies the page contents, not which pages are written).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from migrated.kvm.uapi import kvm_regs, kvm_sregs

from . import abi
from .image import X86_64_WORKLOAD, GuestImage, GuestImageMissingError
from .layout import WorkloadLayout, plan_layout
from .guest_ram import Write
from .x86_64.longmode import kernel_sregs, user_regs, user_sregs, write_long_mode
from .pages import VerifyReport, verify_pages

__all__ = [
    "GuestImageMissingError",
    "IMAGE",
    "Mode",
    "SmallOsStatus",
    "GuestPhase",
    "VcpuStatus",
    "X86VcpuStatus",
    "VerifyReport",
    "WorkloadGuest",
    "WorkloadLayout",
    "WorkloadParams",
    "install",
    "plan_layout",
    "rate_pages_per_vcpu",
    "verify_pages",
    "Write",
]

Mode = Literal["continuous", "passes"]
_MODES: dict[str, int] = {"continuous": abi.WL_MODE_CONTINUOUS, "passes": abi.WL_MODE_PASSES}
MIB = 1 << 20


@dataclass(frozen=True)
class WorkloadParams:
    vcpus: int = 1
    working_set_bytes: int = 16 * MIB
    dirty_rate_mib_s: float = math.inf  # whole VM; 0 = idle; math.inf = as fast as it can
    mode: Mode = "continuous"
    seed: int = 0
    # The x86 small OS (x86_64/abi_smallos.h): a CPL0 kernel under the workload, with interrupts,
    # timers and register/clock/atomic checks. Needs the in-kernel irqchip (and PIT if pit_hz).
    smallos: bool = False
    tick_hz: int = 250  # LAPIC timer, every vCPU
    pit_hz: int = 100  # PIT channel 0 on vCPU 0; 0: PIT left alone
    irq_pin: int = 4  # IOAPIC pin the VMM pulses (boot.pulse_irq), counted by vCPU 0

    def __post_init__(self) -> None:
        if self.smallos:
            if not 1 <= self.tick_hz <= 10_000:
                raise ValueError(f"tick rate {self.tick_hz} Hz: allowed 1 to 10000")
            if not 0 <= self.pit_hz <= 10_000 or 0 < self.pit_hz < 19:
                raise ValueError(f"PIT rate {self.pit_hz} Hz: 0 (off) or 19 to 10000")
            if self.irq_pin not in range(24) or self.irq_pin in (0, 2):
                raise ValueError(f"IOAPIC pin {self.irq_pin}: 1 or 3 to 23 (0 and 2: the PIT)")
        if self.mode not in _MODES:
            raise ValueError(f"mode {self.mode!r}: allowed are {', '.join(_MODES)}")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"seed {self.seed}: must fit in 64 bits, unsigned")
        rate_pages_per_vcpu(self.dirty_rate_mib_s, self.vcpus)  # validates the rate


def rate_pages_per_vcpu(mib_s: float, vcpus: int) -> int:
    """The guest's per-vCPU rate word for a whole-VM rate in MiB/s (0 idle, ~0 unlimited)."""
    if math.isnan(mib_s) or mib_s < 0:
        raise ValueError(f"dirty rate {mib_s} MiB/s: must be >= 0 (math.inf for unlimited)")
    if vcpus < 1:
        raise ValueError(f"{vcpus} vCPUs: must be at least 1")
    if math.isinf(mib_s):
        return abi.WL_RATE_UNLIMITED
    if mib_s == 0:
        return 0
    pages = mib_s * MIB / abi.WL_PAGE_SIZE / vcpus
    return min(abi.WL_RATE_UNLIMITED - 1, max(1, round(pages)))


IMAGE: GuestImage = X86_64_WORKLOAD  # a test points it at the image it built


class ParamsLayout(Protocol):
    """What the parameter page says of a layout, on either architecture."""

    @property
    def vcpus(self) -> int: ...
    @property
    def ws_base(self) -> int: ...
    @property
    def ws_pages(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def gen(self) -> int: ...


def common_params_words(layout: ParamsLayout, params: WorkloadParams, counter_hz: int) -> npt.NDArray[np.uint64]:
    """The parameter page's words that both architectures' guests read (abi.h); each arch's
    loader adds its own. `counter_hz`: the guest's time base (0: the guest measures it)."""
    words = np.zeros(abi.WL_PAGE_WORDS, np.uint64)
    words[abi.WL_P_MAGIC] = abi.WL_PARAMS_MAGIC
    words[abi.WL_P_VERSION] = abi.WL_VERSION
    words[abi.WL_P_NVCPUS] = layout.vcpus
    words[abi.WL_P_WS_BASE] = layout.ws_base
    words[abi.WL_P_WS_PAGES] = layout.ws_pages
    words[abi.WL_P_TSC_HZ] = counter_hz
    words[abi.WL_P_STATUS_BASE] = layout.status
    words[abi.WL_P_GEN_BASE] = layout.gen
    words[abi.WL_P_SEED] = params.seed
    words[abi.WL_P_MODE] = _MODES[params.mode]
    words[abi.WL_P_RATE] = rate_pages_per_vcpu(params.dirty_rate_mib_s, layout.vcpus)
    words[abi.WL_P_PASS_REQ] = 0
    return words


def params_page(layout: WorkloadLayout, params: WorkloadParams, tsc_khz: int) -> bytes:
    words = common_params_words(layout, params, tsc_khz * 1000)
    if params.smallos:
        words[abi.WLX_P_FLAGS] = abi.WLX_F_SMALLOS
        words[abi.WLX_P_TICK_HZ] = params.tick_hz
        words[abi.WLX_P_APIC_HZ] = APIC_TIMER_HZ
        words[abi.WLX_P_PIT_HZ] = params.pit_hz
        words[abi.WLX_P_IRQ_PIN] = params.irq_pin
        words[abi.WLX_P_USER_STACKS] = layout.stacks
        words[abi.WLX_P_USER_STACK_SIZE] = layout.stack_size
    return words.tobytes()


APIC_TIMER_HZ = 1_000_000_000  # KVM's LAPIC timer input clock (APIC_BUS_CYCLE_NS = 1)


def install(
    write: Write, layout: WorkloadLayout, params: WorkloadParams, tsc_khz: int
) -> list[tuple[kvm_regs, kvm_sregs]]:
    """Writes the guest into zeroed RAM; returns (regs, sregs) for each vCPU, in order.

    RAM must be zero where the guest keeps state (status pages, generation arrays, working set),
    as a new VM's is: a never-written page counts as valid only when all zero.
    """
    if params.vcpus != layout.vcpus:
        raise ValueError(f"params for {params.vcpus} vCPUs, layout for {layout.vcpus}")
    if params.working_set_bytes != layout.ws_bytes:
        raise ValueError(f"params for a {params.working_set_bytes}-byte working set, layout for {layout.ws_bytes}")
    if tsc_khz <= 0:
        raise ValueError(f"TSC frequency {tsc_khz} kHz: must be positive (KVM_GET_TSC_KHZ)")
    if params.smallos != bool(layout.longmode.mmio_pd):
        raise ValueError("params and layout disagree on smallos: plan_layout(..., smallos=...)")
    image = IMAGE.load()
    if len(image) > layout.code_max:
        raise ValueError(f"workload image is {len(image)} bytes; its region holds {layout.code_max}")
    write_long_mode(write, layout.longmode)
    write(layout.code, image)
    write(layout.params, params_page(layout, params, tsc_khz))
    if params.smallos:
        # Kernel entry at CPL0 on this vCPU's rsp0 stack; it drops to _start at CPL3 itself.
        lm = layout.longmode
        return [
            (
                user_regs(
                    rip=layout.code + abi.WLX_KERNEL_ENTRY_OFFSET,
                    rsp=lm.kernel_stack_top(v),
                    rdi=v,
                    rsi=layout.params,
                ),
                kernel_sregs(lm, v, xsave=True),
            )
            for v in range(layout.vcpus)
        ]
    return [
        (
            user_regs(rip=layout.entry, rsp=layout.stack_top(v), rdi=v, rsi=layout.params),
            user_sregs(layout.longmode, v),
        )
        for v in range(layout.vcpus)
    ]


class GuestPhase(enum.Enum):
    BOOTING = abi.WL_STATE_BOOTING
    WRITING = abi.WL_STATE_WRITING
    THROTTLED = abi.WL_STATE_THROTTLED
    IDLE = abi.WL_STATE_IDLE
    PASS_WAIT = abi.WL_STATE_PASS_WAIT
    BAD_PARAMS = abi.WL_STATE_BAD_PARAMS
    UNKNOWN = -1


@dataclass(frozen=True)
class SmallOsStatus:
    """The small OS's counters of one vCPU (abi_smallos.h, status words 64 and up)."""

    kstate: int  # WLX_K_*: 1 kernel entered, 2 CPL3 checks running
    features: int  # WLX_FEAT_*
    ticks: int
    ipis: int
    ipis_sent: int
    irqs: int
    pit_ticks: int
    unexpected: int
    faults: int
    fault_vector: int
    fault_rip: int
    msr_checks: int
    msr_mismatches: int
    reg_checks: int
    reg_mismatches: int
    reg_bad_mask: int  # WLX_R_*
    clock_reads: int
    clock_regressions: int
    clock_ns: int
    atomic_own: int
    atomic_shared: int  # meaningful on vCPU 0
    atomic_checks: int
    atomic_violations: int

    @property
    def errors(self) -> dict[str, int]:
        """Every non-zero error counter, by name (empty: clean)."""
        found = {
            "unexpected_interrupts": self.unexpected,
            "faults": self.faults,
            "msr_mismatches": self.msr_mismatches,
            "reg_mismatches": self.reg_mismatches,
            "clock_regressions": self.clock_regressions,
            "atomic_violations": self.atomic_violations,
        }
        return {k: v for k, v in found.items() if v}


def _smallos_status(w: list[int]) -> SmallOsStatus:
    return SmallOsStatus(
        kstate=w[abi.WLX_S_KSTATE],
        features=w[abi.WLX_S_FEATURES],
        ticks=w[abi.WLX_S_TICKS],
        ipis=w[abi.WLX_S_IPIS],
        ipis_sent=w[abi.WLX_S_IPIS_SENT],
        irqs=w[abi.WLX_S_IRQS],
        pit_ticks=w[abi.WLX_S_PIT_TICKS],
        unexpected=w[abi.WLX_S_UNEXPECTED],
        faults=w[abi.WLX_S_FAULTS],
        fault_vector=w[abi.WLX_S_FAULT_VECTOR],
        fault_rip=w[abi.WLX_S_FAULT_RIP],
        msr_checks=w[abi.WLX_S_MSR_CHECKS],
        msr_mismatches=w[abi.WLX_S_MSR_MISMATCHES],
        reg_checks=w[abi.WLX_S_REG_CHECKS],
        reg_mismatches=w[abi.WLX_S_REG_MISMATCHES],
        reg_bad_mask=w[abi.WLX_S_REG_BAD_MASK],
        clock_reads=w[abi.WLX_S_CLOCK_READS],
        clock_regressions=w[abi.WLX_S_CLOCK_REGRESSIONS],
        clock_ns=w[abi.WLX_S_CLOCK_NS],
        atomic_own=w[abi.WLX_S_ATOMIC_OWN],
        atomic_shared=w[abi.WLX_S_ATOMIC_SHARED],
        atomic_checks=w[abi.WLX_S_ATOMIC_CHECKS],
        atomic_violations=w[abi.WLX_S_ATOMIC_VIOLATIONS],
    )


@dataclass(frozen=True)
class VcpuStatus:
    vcpu: int
    started: bool  # the guest wrote its status page's magic
    state: GuestPhase
    heartbeat: int
    pages_written: int
    passes_done: int
    verify_errors: int
    last_error_gpa: int | None
    sweep: int
    busy_page: int | None  # GPA of the page being rewritten
    first_page: int
    page_count: int
    rate_seen: int  # pages/s, as the guest last read it


@dataclass(frozen=True)
class X86VcpuStatus(VcpuStatus):
    smallos: SmallOsStatus | None  # the small OS's counters; None when it does not run


def shared_status(vcpu: int, w: Sequence[int], ws_base: int) -> dict[str, Any]:
    """The VcpuStatus fields every workload guest reports in the same status words (abi.h)."""
    try:
        state = GuestPhase(w[abi.WL_S_STATE])
    except ValueError:
        state = GuestPhase.UNKNOWN
    busy = w[abi.WL_S_BUSY_PAGE]
    return {
        "vcpu": vcpu,
        "started": w[abi.WL_S_MAGIC] == abi.WL_STATUS_MAGIC,
        "state": state,
        "heartbeat": w[abi.WL_S_HEARTBEAT],
        "pages_written": w[abi.WL_S_PAGES_WRITTEN],
        "passes_done": w[abi.WL_S_PASSES_DONE],
        "verify_errors": w[abi.WL_S_VERIFY_ERRORS],
        "last_error_gpa": w[abi.WL_S_LAST_ERROR_GPA] or None,
        "sweep": w[abi.WL_S_SWEEP],
        "busy_page": ws_base + (busy - 1) * abi.WL_PAGE_SIZE if busy else None,
        "first_page": w[abi.WL_S_FIRST_PAGE],
        "page_count": w[abi.WL_S_PAGE_COUNT],
        "rate_seen": w[abi.WL_S_RATE_SEEN],
    }


class GuestLayout(Protocol):
    """What the shared view needs of a layout (x86 `WorkloadLayout`, arm64 `Arm64Layout`)."""

    @property
    def params(self) -> int: ...

    @property
    def vcpus(self) -> int: ...


L = TypeVar("L", bound=GuestLayout)


class GuestView(ABC, Generic[L]):
    """The calls both workload guests answer the same way: the parameter page's words (rate,
    mode, passes) are the same on every architecture (abi.h)."""

    def __init__(self, layout: L) -> None:
        self.layout = layout

    def _params(self, ram: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
        return ram[self.layout.params : self.layout.params + abi.WL_PAGE_SIZE].view(np.uint64)

    def _set_param(self, write: Write, word: int, value: int) -> None:
        write(self.layout.params + 8 * word, int(value).to_bytes(8, "little"))

    @abstractmethod
    def status(self, ram: npt.NDArray[np.uint8]) -> Sequence[VcpuStatus]:
        """Each vCPU's status page; each architecture has words of its own."""

    def set_rate(self, write: Write, mib_s: float) -> None:
        """Whole-VM dirty rate in MiB/s (0 idle, math.inf unlimited); the guest applies it live."""
        self._set_param(write, abi.WL_P_RATE, rate_pages_per_vcpu(mib_s, self.layout.vcpus))

    def set_vcpu_rate(self, write: Write, vcpu: int, mib_s: float) -> None:
        """One vCPU's own dirty rate in MiB/s (math.inf unlimited), live; 0: it follows the
        VM-wide rate again. So one vCPU can dirty fast and another slowly."""
        if not 0 <= vcpu < min(self.layout.vcpus, abi.WL_VCPU_RATES):
            raise ValueError(f"vCPU {vcpu}: this guest has vCPUs 0 to {min(self.layout.vcpus, abi.WL_VCPU_RATES) - 1}")
        pages = 0 if mib_s == 0 else rate_pages_per_vcpu(mib_s, 1)
        self._set_param(write, abi.WL_P_VCPU_RATE + vcpu, pages)

    def set_mode(self, write: Write, mode: Mode) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode {mode!r}: allowed are {', '.join(_MODES)}")
        self._set_param(write, abi.WL_P_MODE, _MODES[mode])

    def request_pass(self, write: Write, ram: npt.NDArray[np.uint8]) -> int:
        """Asks every vCPU for one more pass; returns the pass number to wait for.

        The count lives in guest RAM (not here), so it survives a migration of the guest.
        """
        requested = int(self._params(ram)[abi.WL_P_PASS_REQ]) + 1
        self._set_param(write, abi.WL_P_PASS_REQ, requested)
        return requested

    def passes_done(self, ram: npt.NDArray[np.uint8]) -> list[int]:
        return [s.passes_done for s in self.status(ram)]


class WorkloadGuest(GuestView[WorkloadLayout]):
    """The VMM's view of a running workload guest, through guest RAM alone (it migrates with it)."""

    def __init__(self, layout: WorkloadLayout) -> None:
        super().__init__(layout)
        self.smallos = bool(layout.longmode.mmio_pd)

    def status(self, ram: npt.NDArray[np.uint8]) -> list[X86VcpuStatus]:
        result = []
        for v in range(self.layout.vcpus):
            gpa = self.layout.status_gpa(v)
            words = 100 if self.smallos else 16
            w = [int(x) for x in ram[gpa : gpa + 8 * words].view(np.uint64)]
            result.append(
                X86VcpuStatus(
                    **shared_status(v, w, self.layout.ws_base),
                    smallos=_smallos_status(w) if self.smallos else None,
                )
            )
        return result

    def verify(self, ram: npt.NDArray[np.uint8], *, pattern: bool = True) -> VerifyReport:
        return verify_pages(ram, self.layout, pattern=pattern)
