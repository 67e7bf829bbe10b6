"""Where everything of the workload guest lives in guest-physical memory.

    0x000000  supervisor 2 MiB (no U bit): reserved page 0, PML4, PDPT, GDT, IDT (reserved),
              TSSes, page directories, room for a kernel, kernel (rsp0) stacks
    0x200000  user (U bit) from here up: code (fixed link address), parameter page, status
              pages, user stacks, generation arrays
    2 MiB up  the working set, 2 MiB aligned, after the metadata, up to the end of RAM

The supervisor region is fixed so a later kernel can rely on its addresses; what follows the
parameter page depends on vCPUs and working-set size and is published in the parameter page.
"""

from __future__ import annotations

from dataclasses import dataclass

from .abi import WL_PAGE_SIZE as PAGE_SIZE
from .x86_64.longmode import GIB, HUGE_PAGE, LongModeSpec

MAX_VCPUS = 64
MAX_MEMORY = 64 * GIB  # 64 page directories

PML4_GPA = 0x1000
PDPT_GPA = 0x2000
GDT_GPA = 0x3000
IDT_GPA = 0x4000
TSS_GPA = 0x5000
TSS_STRIDE = 128
PD_GPA = 0x8000  # up to MAX_MEMORY / 1 GiB pages, to 0x48000
KERNEL_RESERVED = (0x48000, 0x100000)  # for a later kernel's code and data
MMIO_PD_GPA = 0x48000  # the small OS's page directory for the IOAPIC/LAPIC frames (4th GiB)
SMALLOS_MAX_MEMORY = 3 * GIB  # the small OS maps the 4th GiB's top as MMIO
KERNEL_STACKS_GPA = 0x100000
KERNEL_STACK_SIZE = 16 << 10  # MAX_VCPUS of them fill the region up to USER_BASE
USER_BASE = 0x200000
# Keep in step with x86_64/workload.ld (a test checks).
CODE_GPA = 0x200000
CODE_MAX = 0x40000
PARAMS_GPA = CODE_GPA + CODE_MAX
STATUS_GPA = PARAMS_GPA + PAGE_SIZE
USER_STACK_SIZE = 16 << 10

assert TSS_GPA + MAX_VCPUS * TSS_STRIDE <= PD_GPA
assert PD_GPA + (MAX_MEMORY // GIB) * PAGE_SIZE <= KERNEL_RESERVED[0]
assert KERNEL_STACKS_GPA + MAX_VCPUS * KERNEL_STACK_SIZE <= USER_BASE


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


class WorkingSetGeometry:
    """The working set, status pages and stacks as both guests lay them out (x86 and arm64
    layouts alike): derived from the fields the dataclass that inherits this one declares."""

    vcpus: int
    status: int
    stacks: int
    stack_size: int
    ws_base: int
    ws_pages: int

    @property
    def ws_bytes(self) -> int:
        return self.ws_pages * PAGE_SIZE

    @property
    def ws_end(self) -> int:
        return self.ws_base + self.ws_bytes

    def status_gpa(self, vcpu: int) -> int:
        return self.status + vcpu * PAGE_SIZE

    def stack_top(self, vcpu: int) -> int:
        return self.stacks + (vcpu + 1) * self.stack_size

    def share(self, vcpu: int) -> tuple[int, int]:
        """(first global page index, page count) of `vcpu`'s contiguous share, as the guest splits."""
        first = vcpu * self.ws_pages // self.vcpus
        return first, (vcpu + 1) * self.ws_pages // self.vcpus - first


@dataclass(frozen=True)
class WorkloadLayout(WorkingSetGeometry):
    memory_bytes: int
    vcpus: int
    longmode: LongModeSpec
    code: int
    code_max: int
    entry: int
    params: int
    status: int  # vCPU i's status page at status + i * PAGE_SIZE
    stacks: int  # vCPU i's user stack: [stacks + i * stack_size, + stack_size)
    stack_size: int
    gen: int  # u32 generation per working-set page, by global page index
    gen_bytes: int
    metadata_end: int
    ws_base: int
    ws_pages: int

    def describe(self) -> dict[str, str]:
        """Human-readable GPA ranges, for logs and reports."""
        lm = self.longmode

        def span(start: int, size: int) -> str:
            return f"{start:#x}-{start + size:#x}"

        return {
            "page tables": span(lm.pml4, PAGE_SIZE * 2) + f" + PDs {span(lm.pd, lm.pd_count * PAGE_SIZE)}",
            "gdt": span(lm.gdt, lm.gdt_limit + 1),
            "idt (reserved)": span(lm.idt, PAGE_SIZE),
            "tss": span(lm.tss, self.vcpus * lm.tss_stride),
            "kernel reserved": span(KERNEL_RESERVED[0], KERNEL_RESERVED[1] - KERNEL_RESERVED[0]),
            "kernel stacks": span(lm.kernel_stacks, self.vcpus * lm.kernel_stack_size),
            "code": span(self.code, self.code_max),
            "params": span(self.params, PAGE_SIZE),
            "status": span(self.status, self.vcpus * PAGE_SIZE),
            "user stacks": span(self.stacks, self.vcpus * self.stack_size),
            "generations": span(self.gen, self.gen_bytes),
            "working set": span(self.ws_base, self.ws_bytes),
        }


def check_sizes(memory_bytes: int, vcpus: int, working_set_bytes: int) -> int:
    """The checks every architecture's layout makes first; returns the working set's pages."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"{vcpus} vCPUs: the workload guest supports 1 to {MAX_VCPUS}")
    if memory_bytes <= 0 or memory_bytes % PAGE_SIZE:
        raise ValueError(f"memory {memory_bytes} bytes: must be a positive multiple of {PAGE_SIZE}")
    if working_set_bytes <= 0 or working_set_bytes % PAGE_SIZE:
        raise ValueError(f"working set {working_set_bytes} bytes: must be a positive multiple of {PAGE_SIZE}")
    ws_pages = working_set_bytes // PAGE_SIZE
    if ws_pages < vcpus:
        raise ValueError(f"working set of {ws_pages} pages is smaller than {vcpus} vCPUs: each needs a page")
    return ws_pages


def plan_layout(memory_bytes: int, vcpus: int, working_set_bytes: int, *, smallos: bool = False) -> WorkloadLayout:
    """Places everything; raises ValueError naming what does not fit. `smallos`: the x86 small
    OS (abi_smallos.h), which also maps the IOAPIC and LAPIC frames and needs RAM below 3 GiB."""
    if smallos and memory_bytes > SMALLOS_MAX_MEMORY:
        raise ValueError(
            f"memory {memory_bytes >> 20} MiB: the small-OS guest supports at most "
            f"{SMALLOS_MAX_MEMORY >> 20} MiB (the 4th GiB holds the IOAPIC and LAPIC)"
        )
    ws_pages = check_sizes(memory_bytes, vcpus, working_set_bytes)
    if memory_bytes > MAX_MEMORY:
        raise ValueError(
            f"memory {memory_bytes >> 20} MiB: the workload guest maps at most "
            f"{MAX_MEMORY >> 30} GiB (one page directory per GiB below {KERNEL_RESERVED[0]:#x})"
        )
    stacks = STATUS_GPA + vcpus * PAGE_SIZE
    gen = stacks + vcpus * USER_STACK_SIZE
    gen_bytes = _align_up(ws_pages * 4, PAGE_SIZE)
    metadata_end = gen + gen_bytes
    ws_base = _align_up(metadata_end, HUGE_PAGE)
    if ws_base + working_set_bytes > memory_bytes:
        room = max(0, memory_bytes - ws_base)
        raise ValueError(
            f"working set of {working_set_bytes >> 20} MiB does not fit: {memory_bytes >> 20} MiB "
            f"of RAM minus {ws_base >> 20} MiB of guest metadata (system tables, code, "
            f"{vcpus} vCPUs' pages, generation arrays) leaves {room >> 20} MiB"
        )
    longmode = LongModeSpec(
        memory_bytes=memory_bytes,
        vcpus=vcpus,
        pml4=PML4_GPA,
        pdpt=PDPT_GPA,
        pd=PD_GPA,
        gdt=GDT_GPA,
        idt=IDT_GPA,
        tss=TSS_GPA,
        tss_stride=TSS_STRIDE,
        kernel_stacks=KERNEL_STACKS_GPA,
        kernel_stack_size=KERNEL_STACK_SIZE,
        user_base=USER_BASE,
        mmio_pd=MMIO_PD_GPA if smallos else 0,
    )
    return WorkloadLayout(
        memory_bytes=memory_bytes,
        vcpus=vcpus,
        longmode=longmode,
        code=CODE_GPA,
        code_max=CODE_MAX,
        entry=CODE_GPA,
        params=PARAMS_GPA,
        status=STATUS_GPA,
        stacks=stacks,
        stack_size=USER_STACK_SIZE,
        gen=gen,
        gen_bytes=gen_bytes,
        metadata_end=metadata_end,
        ws_base=ws_base,
        ws_pages=ws_pages,
    )
