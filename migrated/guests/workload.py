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
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from migrated.kvm.uapi import kvm_regs, kvm_sregs

from . import abi
from .build import IMAGE_NAME
from .layout import WorkloadLayout, plan_layout
from .longmode import Write, user_regs, user_sregs, write_long_mode
from .pages import VerifyReport, verify_pages

__all__ = [
    "GuestImageMissingError",
    "Mode",
    "VcpuState",
    "VcpuStatus",
    "VerifyReport",
    "WorkloadGuest",
    "WorkloadLayout",
    "WorkloadParams",
    "image_path",
    "install",
    "load_image",
    "plan_layout",
    "rate_pages_per_vcpu",
    "verify_pages",
    "Write",
]

Mode = Literal["continuous", "passes"]
_MODES: dict[str, int] = {"continuous": abi.WL_MODE_CONTINUOUS, "passes": abi.WL_MODE_PASSES}
MIB = 1 << 20


class GuestImageMissingError(FileNotFoundError):
    """The workload image was not built (it is made by the package build, not at import)."""


@dataclass(frozen=True)
class WorkloadParams:
    vcpus: int = 1
    working_set_bytes: int = 16 * MIB
    dirty_rate_mib_s: float = math.inf  # whole VM; 0 = idle; math.inf = as fast as it can
    mode: Mode = "continuous"
    seed: int = 0

    def __post_init__(self) -> None:
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


def image_path() -> Path:
    return Path(__file__).resolve().parent / IMAGE_NAME


def load_image() -> bytes:
    path = image_path()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GuestImageMissingError(
            f"workload guest image {path} is missing: run `make build` (or "
            "`python -m migrated.guests.build`) to compile it from migrated/guests/x86_64/"
        ) from None


def params_page(layout: WorkloadLayout, params: WorkloadParams, tsc_khz: int) -> bytes:
    words = np.zeros(abi.WL_PAGE_WORDS, np.uint64)
    words[abi.WL_P_MAGIC] = abi.WL_PARAMS_MAGIC
    words[abi.WL_P_VERSION] = abi.WL_VERSION
    words[abi.WL_P_NVCPUS] = layout.vcpus
    words[abi.WL_P_WS_BASE] = layout.ws_base
    words[abi.WL_P_WS_PAGES] = layout.ws_pages
    words[abi.WL_P_TSC_HZ] = tsc_khz * 1000
    words[abi.WL_P_STATUS_BASE] = layout.status
    words[abi.WL_P_GEN_BASE] = layout.gen
    words[abi.WL_P_SEED] = params.seed
    words[abi.WL_P_MODE] = _MODES[params.mode]
    words[abi.WL_P_RATE] = rate_pages_per_vcpu(params.dirty_rate_mib_s, layout.vcpus)
    words[abi.WL_P_PASS_REQ] = 0
    return words.tobytes()


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
        raise ValueError(
            f"params for a {params.working_set_bytes}-byte working set, layout for {layout.ws_bytes}"
        )
    if tsc_khz <= 0:
        raise ValueError(f"TSC frequency {tsc_khz} kHz: must be positive (KVM_GET_TSC_KHZ)")
    image = load_image()
    if len(image) > layout.code_max:
        raise ValueError(f"workload image is {len(image)} bytes; its region holds {layout.code_max}")
    write_long_mode(write, layout.longmode)
    write(layout.code, image)
    write(layout.params, params_page(layout, params, tsc_khz))
    return [
        (
            user_regs(rip=layout.entry, rsp=layout.stack_top(v), rdi=v, rsi=layout.params),
            user_sregs(layout.longmode, v),
        )
        for v in range(layout.vcpus)
    ]


class VcpuState(enum.Enum):
    BOOTING = abi.WL_STATE_BOOTING
    WRITING = abi.WL_STATE_WRITING
    THROTTLED = abi.WL_STATE_THROTTLED
    IDLE = abi.WL_STATE_IDLE
    PASS_WAIT = abi.WL_STATE_PASS_WAIT
    BAD_PARAMS = abi.WL_STATE_BAD_PARAMS
    UNKNOWN = -1


@dataclass(frozen=True)
class VcpuStatus:
    vcpu: int
    started: bool  # the guest wrote its status page's magic
    state: VcpuState
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


class WorkloadGuest:
    """The VMM's view of a running workload guest, through guest RAM alone (it migrates with it)."""

    def __init__(self, layout: WorkloadLayout) -> None:
        self.layout = layout

    def _params(self, ram: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
        return ram[self.layout.params : self.layout.params + abi.WL_PAGE_SIZE].view(np.uint64)

    def _set_param(self, write: Write, word: int, value: int) -> None:
        write(self.layout.params + 8 * word, int(value).to_bytes(8, "little"))

    def status(self, ram: npt.NDArray[np.uint8]) -> list[VcpuStatus]:
        result = []
        for v in range(self.layout.vcpus):
            gpa = self.layout.status_gpa(v)
            w = [int(x) for x in ram[gpa : gpa + 8 * 16].view(np.uint64)]
            try:
                state = VcpuState(w[abi.WL_S_STATE])
            except ValueError:
                state = VcpuState.UNKNOWN
            busy = w[abi.WL_S_BUSY_PAGE]
            result.append(
                VcpuStatus(
                    vcpu=v,
                    started=w[abi.WL_S_MAGIC] == abi.WL_STATUS_MAGIC,
                    state=state,
                    heartbeat=w[abi.WL_S_HEARTBEAT],
                    pages_written=w[abi.WL_S_PAGES_WRITTEN],
                    passes_done=w[abi.WL_S_PASSES_DONE],
                    verify_errors=w[abi.WL_S_VERIFY_ERRORS],
                    last_error_gpa=w[abi.WL_S_LAST_ERROR_GPA] or None,
                    sweep=w[abi.WL_S_SWEEP],
                    busy_page=self.layout.ws_base + (busy - 1) * abi.WL_PAGE_SIZE if busy else None,
                    first_page=w[abi.WL_S_FIRST_PAGE],
                    page_count=w[abi.WL_S_PAGE_COUNT],
                    rate_seen=w[abi.WL_S_RATE_SEEN],
                )
            )
        return result

    def set_rate(self, write: Write, mib_s: float) -> None:
        """Whole-VM dirty rate in MiB/s (0 idle, math.inf unlimited); the guest applies it live."""
        self._set_param(write, abi.WL_P_RATE, rate_pages_per_vcpu(mib_s, self.layout.vcpus))

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

    def verify(self, ram: npt.NDArray[np.uint8], *, pattern: bool = True) -> VerifyReport:
        return verify_pages(ram, self.layout, pattern=pattern)
