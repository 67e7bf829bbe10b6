"""64-bit long mode built by the VMM: identity page tables, GDT, TSSes and the vCPU registers.

A vCPU starts directly in 64-bit mode at CPL3, where PVM runs guest code natively (HOST-NOTES:
CPL0 code is emulated at ~1-2 M instructions/s). Every byte goes through the caller's `write`, so
the VMM can mark its own writes dirty (DESIGN R5); nothing here touches KVM.

GDT: 0x00 null, 0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user code (the order
`syscall`/`sysret` want, for later), then one 16-byte TSS descriptor per vCPU from 0x28.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from migrated.kvm.uapi import kvm_regs, kvm_segment, kvm_sregs

# The VMM's way into guest RAM: `write(gpa, data)` stores and marks the pages dirty (R5).
from ..guest_ram import Write

PAGE_SIZE = 4096
HUGE_PAGE = 2 << 20
GIB = 1 << 30
TSS_BYTES = 104  # 64-bit TSS, no I/O bitmap

KERNEL_CS = 0x08
KERNEL_DS = 0x10
USER_DS = 0x18 | 3
USER_CS = 0x20 | 3
FIRST_TSS = 0x28

# Page-table entry bits. A and D are preset so the CPU never writes the tables (such writes would
# dirty them, and on PVM may be emulated).
PTE_P, PTE_RW, PTE_US, PTE_PWT, PTE_PCD, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 0x20, 0x200, 0x400, 1 << 18
EFER_LME, EFER_LMA = 0x100, 0x400
CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
EFER = EFER_LME | EFER_LMA
APIC_BASE = 0xFEE00000
APIC_BASE_ENABLE, APIC_BASE_BSP = 0x800, 0x100
RFLAGS_RESERVED = 0x2  # bit 1 is always set; IF stays clear (no interrupts yet)


@dataclass(frozen=True)
class LongModeSpec:
    """Where the system tables go. 2 MiB pages from `user_base` up carry the U bit."""

    memory_bytes: int
    vcpus: int
    pml4: int
    pdpt: int
    pd: int  # first page directory; one per GiB, contiguous
    gdt: int
    idt: int  # a zeroed page reserved for a later IDT
    tss: int  # vCPU i's TSS at tss + i * tss_stride
    tss_stride: int
    kernel_stacks: int  # vCPU i's rsp0 stack: [kernel_stacks + i * size, + size)
    kernel_stack_size: int
    user_base: int
    # A page directory for the 4th GiB mapping the IOAPIC (0xfec00000) and LAPIC (0xfee00000)
    # 2 MiB frames, supervisor and uncached; 0: none. Only with memory below 3 GiB.
    mmio_pd: int = 0

    @property
    def mapped_bytes(self) -> int:
        return -(-self.memory_bytes // HUGE_PAGE) * HUGE_PAGE

    @property
    def pd_count(self) -> int:
        return pd_count(self.memory_bytes)

    @property
    def gdt_limit(self) -> int:
        return FIRST_TSS + 16 * self.vcpus - 1

    def tss_gpa(self, vcpu: int) -> int:
        return self.tss + vcpu * self.tss_stride

    def tss_selector(self, vcpu: int) -> int:
        return FIRST_TSS + 16 * vcpu

    def kernel_stack_top(self, vcpu: int) -> int:
        return self.kernel_stacks + (vcpu + 1) * self.kernel_stack_size


def pd_count(memory_bytes: int) -> int:
    return max(1, -(-memory_bytes // GIB))


def page_tables(spec: LongModeSpec) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
    """PML4, PDPT and all PDs (as one array) identity-mapping `mapped_bytes` with 2 MiB pages."""
    table = PTE_P | PTE_RW | PTE_US | PTE_A  # U on every upper level; the PDE decides
    pml4 = np.zeros(512, np.uint64)
    pml4[0] = spec.pdpt | table
    pdpt = np.zeros(512, np.uint64)
    n_pd = spec.pd_count
    pdpt[:n_pd] = spec.pd + PAGE_SIZE * np.arange(n_pd, dtype=np.uint64) | table
    pds = np.zeros(512 * n_pd, np.uint64)
    addresses = np.arange(spec.mapped_bytes // HUGE_PAGE, dtype=np.uint64) * HUGE_PAGE
    user = np.where(addresses >= spec.user_base, PTE_US, 0).astype(np.uint64)
    pds[: addresses.size] = addresses | (PTE_P | PTE_RW | PTE_A | PTE_D | PTE_PS) | user
    return pml4.tobytes(), pdpt.tobytes(), pds


MMIO_FRAMES = (0xFEC00000, 0xFEE00000)  # IOAPIC, LAPIC


def mmio_page_directory(spec: LongModeSpec) -> npt.NDArray[np.uint64]:
    """The PD of the 4th GiB: the IOAPIC and LAPIC frames, supervisor, uncached."""
    if spec.mmio_pd and spec.pd_count > 3:
        raise ValueError(
            f"{spec.memory_bytes >> 20} MiB of RAM reaches the 4th GiB: RAM would cover the "
            "IOAPIC and LAPIC (the small OS needs memory below 3 GiB)"
        )
    pd = np.zeros(512, np.uint64)
    for frame in MMIO_FRAMES:
        pd[(frame - 3 * GIB) // HUGE_PAGE] = frame | (PTE_P | PTE_RW | PTE_PWT | PTE_PCD | PTE_A | PTE_D | PTE_PS)
    return pd


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | access << 40
        | (limit >> 16 & 0xF) << 48
        | flags << 52
        | (base >> 24 & 0xFF) << 56
    )


# access: P | DPL << 5 | S | type, with the accessed bit preset (the CPU would otherwise write
# it into the GDT when a selector is loaded); flags: G | D/B | L.
_P, _S = 0x80, 0x10
_CODE, _DATA, _TSS_BUSY = 0xB, 0x3, 0xB
_G, _DB, _L = 0x8, 0x4, 0x2


def gdt(spec: LongModeSpec) -> bytes:
    entries = [
        0,
        _descriptor(0, 0xFFFFF, _P | _S | _CODE, _G | _L),
        _descriptor(0, 0xFFFFF, _P | _S | _DATA, _G | _DB),
        _descriptor(0, 0xFFFFF, _P | 3 << 5 | _S | _DATA, _G | _DB),
        _descriptor(0, 0xFFFFF, _P | 3 << 5 | _S | _CODE, _G | _L),
    ]
    for vcpu in range(spec.vcpus):
        base = spec.tss_gpa(vcpu)
        # Busy, as after `ltr`: TR is loaded through KVM_SET_SREGS already.
        entries.append(_descriptor(base, TSS_BYTES - 1, _P | _TSS_BUSY, 0))
        entries.append(base >> 32)
    return np.array(entries, dtype=np.uint64).tobytes()


def tss(spec: LongModeSpec, vcpu: int) -> bytes:
    raw = np.zeros(TSS_BYTES, np.uint8)
    raw[4:12] = np.frombuffer(spec.kernel_stack_top(vcpu).to_bytes(8, "little"), np.uint8)
    raw[102:104] = np.frombuffer(TSS_BYTES.to_bytes(2, "little"), np.uint8)  # no I/O bitmap
    return raw.tobytes()


def write_long_mode(write: Write, spec: LongModeSpec) -> None:
    """Writes the page tables, GDT and every vCPU's TSS into guest RAM through `write`."""
    pml4, pdpt, pds = page_tables(spec)
    if spec.mmio_pd:
        table = np.frombuffer(pdpt, np.uint64).copy()
        table[3] = spec.mmio_pd | PTE_P | PTE_RW | PTE_US | PTE_A
        pdpt = table.tobytes()
        write(spec.mmio_pd, mmio_page_directory(spec).tobytes())
    write(spec.pml4, pml4)
    write(spec.pdpt, pdpt)
    write(spec.pd, pds.tobytes())
    write(spec.gdt, gdt(spec))
    for vcpu in range(spec.vcpus):
        write(spec.tss_gpa(vcpu), tss(spec, vcpu))


def _segment(selector: int, type_: int, *, code: bool) -> kvm_segment:
    return kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=type_,
        present=1,
        dpl=selector & 3,
        db=0 if code else 1,
        s=1,
        l=1 if code else 0,
        g=1,
    )


def user_sregs(spec: LongModeSpec, vcpu: int) -> kvm_sregs:
    """64-bit mode at CPL3 (CS.DPL = 3), paging on, this vCPU's TSS in TR."""
    sregs = kvm_sregs()
    sregs.cs = _segment(USER_CS, _CODE, code=True)
    data = _segment(USER_DS, _DATA, code=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = kvm_segment(
        base=spec.tss_gpa(vcpu),
        limit=TSS_BYTES - 1,
        selector=spec.tss_selector(vcpu),
        type=_TSS_BUSY,
        present=1,
        dpl=0,
        s=0,
        l=0,
        g=0,
    )
    sregs.ldt = kvm_segment(selector=0, type=2, present=0, unusable=1)
    sregs.gdt.base, sregs.gdt.limit = spec.gdt, spec.gdt_limit
    # No IDT yet: any exception ends in a triple fault (KVM_EXIT_SHUTDOWN) the VMM reports.
    sregs.idt.base, sregs.idt.limit = spec.idt, 0
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = CR0, spec.pml4, CR4, EFER
    sregs.apic_base = APIC_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if vcpu == 0 else 0)
    return sregs


def kernel_sregs(spec: LongModeSpec, vcpu: int, *, xsave: bool) -> kvm_sregs:
    """64-bit mode at CPL0 (the small OS's kernel entry); `xsave` presets CR4.OSXSAVE (the VMM
    sets XCR0 with KVM_SET_XCRS: `xsetbv` cannot run at CPL0 on PVM, HOST-NOTES)."""
    sregs = user_sregs(spec, vcpu)
    sregs.cs = _segment(KERNEL_CS, _CODE, code=True)
    data = _segment(KERNEL_DS, _DATA, code=False)
    sregs.ds = sregs.es = sregs.ss = data
    # FS/GS keep the user data selector: the kernel sets the FS base by MSR and never reloads it.
    if xsave:
        sregs.cr4 |= CR4_OSXSAVE
    return sregs


def user_regs(*, rip: int, rsp: int, rdi: int = 0, rsi: int = 0) -> kvm_regs:
    return kvm_regs(rip=rip, rsp=rsp, rdi=rdi, rsi=rsi, rflags=RFLAGS_RESERVED)
