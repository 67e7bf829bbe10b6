"""Raw images: a boot sector or flat binary put into guest RAM and started as a BIOS would start it.

`entry="real"` (the default): real mode, CS:IP = 0:load_addr (for a load address above 64 KiB,
(load_addr >> 4):(load_addr & 0xf)), every data segment base 0 and limit 0xffff, SS:SP = 0:7c00,
DL = 0x80 (the boot drive), IF clear, CR0 = ET only (protection and paging off, caches on, as a
BIOS leaves them), IDTR = the real-mode vector table at 0 (empty: there is no BIOS to call).

`entry="long"`: 64-bit mode at CPL0 at `load_addr`, for a flat binary linked for long mode: all
RAM identity-mapped with 2 MiB pages, a flat GDT (code 0x08, data 0x10, a TSS at 0x28), no IDT,
rsp below 0x7c00 (or above the tables in very large guests). The tables sit in low memory,
[0x1000, `long_mode_tables_end(memory)`), which the image must leave alone.

DESIGN section 7: nothing here needs to know what the image does. The devices a raw guest talks to
(COM1, port 0x92, the floating legacy ports) are `migrated.devices.pc_ports()`; the VMM attaches
them to the vCPU. Every byte goes through `vm.write_guest` (R5: the pages are marked dirty).
"""

from __future__ import annotations

import os
from pathlib import Path

from migrated.kvm.uapi import kvm_regs, kvm_segment, kvm_sregs
from migrated.kvm.arch import arch_of
from migrated.kvm.vm import Vm

from . import longmode
from .longmode import HUGE_PAGE, PAGE_SIZE, LongModeSpec

ENTRIES = ("real", "long")
DEFAULT_LOAD_ADDR = 0x7C00
BOOT_SECTOR_BYTES = 512
BOOT_SIGNATURE = b"\x55\xaa"
BOOT_DRIVE = 0x80  # DL: the first hard disk
BOOT_STACK = 0x7C00  # SS:SP = 0:7c00, just below the sector
REAL_MODE_END = 0x100000  # what CS:IP can reach at start (1 MiB)
RFLAGS_RESERVED = 0x2
CR0_ET = 0x10

# entry="long": system tables in low memory.
LONG_PML4 = 0x1000
LONG_PDPT = 0x2000
LONG_GDT = 0x3000
LONG_TSS = 0x4000
LONG_PD = 0x5000  # one page directory per GiB of RAM from here

_CODE_TYPE = 0xB  # execute/read, accessed
_DATA_TYPE = 0x3  # read/write, accessed


class RawImageError(ValueError):
    """A raw image that cannot be started as asked; the message says what and why."""


def long_mode_tables_end(memory_bytes: int) -> int:
    return LONG_PD + longmode.pd_count(memory_bytes) * PAGE_SIZE


def long_mode_stack(memory_bytes: int) -> int:
    end = long_mode_tables_end(memory_bytes)
    return BOOT_STACK if end + PAGE_SIZE <= BOOT_STACK else end + PAGE_SIZE


def check_raw_image(
    image_bytes: int | bytes,
    memory_bytes: int,
    load_addr: int = DEFAULT_LOAD_ADDR,
    entry: str = "real",
    *,
    vcpus: int = 1,
) -> list[str]:
    """Refuse what cannot start (RawImageError); return warnings about what starts but is odd.

    `image_bytes`: the image, or only its size (for a check before the file is read; the boot
    signature is then not looked at). Assumes RAM is one range from guest-physical 0.
    """
    size = image_bytes if isinstance(image_bytes, int) else len(image_bytes)
    if entry not in ENTRIES:
        raise RawImageError(f"entry {entry!r}: allowed are {', '.join(ENTRIES)}")
    if vcpus != 1:
        raise RawImageError(
            f"a raw image starts on one vCPU; this VM has {vcpus} (a BIOS would hold the others "
            "waiting for a SIPI, and raw guests have no in-kernel APIC to send one)"
        )
    if isinstance(load_addr, bool) or not isinstance(load_addr, int) or load_addr < 0:
        raise RawImageError(f"load address {load_addr!r}: a guest-physical address (integer >= 0)")
    if size <= 0:
        raise RawImageError("the image is empty")
    if load_addr >= memory_bytes:
        raise RawImageError(f"load address {load_addr:#x} is not in guest RAM [0, {memory_bytes:#x})")
    if load_addr + size > memory_bytes:
        raise RawImageError(
            f"an image of {size} bytes at {load_addr:#x} ends at {load_addr + size:#x}, past the "
            f"end of guest RAM ({memory_bytes:#x}): at most {memory_bytes - load_addr} bytes fit"
        )
    if entry == "real" and load_addr >= REAL_MODE_END:
        raise RawImageError(
            f"load address {load_addr:#x}: real mode starts below 1 MiB ({REAL_MODE_END:#x}); "
            "use --entry long, or load lower"
        )
    if entry == "long":
        tables_end = long_mode_tables_end(memory_bytes)
        if load_addr < tables_end and load_addr + size > LONG_PML4:
            raise RawImageError(
                f"an image at {load_addr:#x}-{load_addr + size:#x} overlaps the long-mode page "
                f"tables and GDT at {LONG_PML4:#x}-{tables_end:#x}: load it at or above "
                f"{tables_end:#x}"
            )
    warnings: list[str] = []
    if entry == "real" and load_addr == DEFAULT_LOAD_ADDR and not isinstance(image_bytes, int):
        if size < BOOT_SECTOR_BYTES or image_bytes[510:512] != BOOT_SIGNATURE:
            found = image_bytes[510:512].hex() if size >= BOOT_SECTOR_BYTES else "nothing"
            warnings.append(
                f"no boot signature 55aa at offset 510 (found {found}): a BIOS would not boot "
                "this image; starting it anyway"
            )
    return warnings


def read_raw_image(path: str | os.PathLike[str], memory_bytes: int) -> bytes:
    """The file's bytes, refusing before reading one that could not fit in guest RAM."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > memory_bytes:
                raise RawImageError(f"image {path} is {size} bytes, larger than guest RAM ({memory_bytes} bytes)")
            return file.read(memory_bytes + 1)
    except OSError as err:
        raise RawImageError(f"cannot read image {path}: {err.strerror or err}") from None


def load_raw(vm: Vm, image: bytes, load_addr: int = DEFAULT_LOAD_ADDR, entry: str = "real") -> list[str]:
    """Write `image` at `load_addr` and set vCPU 0 to start it. The VM is fresh (zeroed RAM,
    vCPUs not started). Returns warnings (see `check_raw_image`) for the caller to log."""
    assert vm.memory is not None
    if not arch_of(vm).boots_raw_images:
        raise RawImageError(f"raw images are x86 boot sectors and binaries; this host is {vm.arch.name}")
    memory_bytes = vm.memory.size
    warnings = check_raw_image(image, memory_bytes, load_addr, entry, vcpus=len(vm.vcpus))
    vcpu = vm.vcpus[0]
    vm.write_guest(load_addr, bytes(image))
    if entry == "real":
        regs, sregs = real_mode_state(vcpu.get_sregs(), load_addr)
    else:
        spec = long_mode_spec(memory_bytes)
        longmode.write_long_mode(vm.write_guest, spec)
        regs, sregs = long_mode_state(vcpu.get_sregs(), spec, load_addr)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
    return warnings


def _real_segment(segment: int, type_: int) -> kvm_segment:
    return kvm_segment(
        base=segment << 4,
        limit=0xFFFF,
        selector=segment,
        type=type_,
        present=1,
        dpl=0,
        db=0,
        s=1,
        l=0,
        g=0,
        avl=0,
        unusable=0,
    )


def real_mode_state(reset: kvm_sregs, load_addr: int) -> tuple[kvm_regs, kvm_sregs]:
    """Registers for a boot sector at `load_addr`, from the vCPU's reset sregs (which keep the
    APIC base, TR and LDTR that KVM set up)."""
    if not 0 <= load_addr < REAL_MODE_END:
        raise RawImageError(f"load address {load_addr:#x}: real mode starts below 1 MiB")
    code_segment, ip = (0, load_addr) if load_addr <= 0xFFFF else (load_addr >> 4, load_addr & 0xF)
    sregs = kvm_sregs.from_buffer_copy(reset)
    sregs.cs = _real_segment(code_segment, _CODE_TYPE)
    data = _real_segment(0, _DATA_TYPE)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.idt.base, sregs.idt.limit = 0, 0x3FF
    sregs.gdt.base, sregs.gdt.limit = 0, 0xFFFF
    sregs.cr0 = CR0_ET
    sregs.cr2 = sregs.cr3 = sregs.cr4 = sregs.cr8 = 0
    sregs.efer = 0
    regs = kvm_regs(rip=ip, rsp=BOOT_STACK, rdx=BOOT_DRIVE, rflags=RFLAGS_RESERVED)
    return regs, sregs


def long_mode_spec(memory_bytes: int) -> LongModeSpec:
    mapped = -(-memory_bytes // HUGE_PAGE) * HUGE_PAGE
    return LongModeSpec(
        memory_bytes=memory_bytes,
        vcpus=1,
        pml4=LONG_PML4,
        pdpt=LONG_PDPT,
        pd=LONG_PD,
        gdt=LONG_GDT,
        idt=0,  # no IDT: IDTR limit 0, an exception ends in a triple fault the VMM reports
        tss=LONG_TSS,
        tss_stride=PAGE_SIZE,
        kernel_stacks=long_mode_stack(memory_bytes) - PAGE_SIZE,  # the TSS's rsp0
        kernel_stack_size=PAGE_SIZE,
        user_base=mapped,  # no page carries the U bit: the image runs at CPL0
    )


def long_mode_state(reset: kvm_sregs, spec: LongModeSpec, load_addr: int) -> tuple[kvm_regs, kvm_sregs]:
    """64-bit mode at CPL0 at `load_addr`, paging with `spec`'s tables (written separately)."""
    sregs = kvm_sregs.from_buffer_copy(reset)
    sregs.cs = kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=longmode.KERNEL_CS,
        type=_CODE_TYPE,
        present=1,
        dpl=0,
        db=0,
        s=1,
        l=1,
        g=1,
    )
    data = kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=longmode.KERNEL_DS,
        type=_DATA_TYPE,
        present=1,
        dpl=0,
        db=1,
        s=1,
        l=0,
        g=1,
    )
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = kvm_segment(
        base=spec.tss_gpa(0),
        limit=longmode.TSS_BYTES - 1,
        selector=spec.tss_selector(0),
        type=0xB,
        present=1,
        dpl=0,
        s=0,
        l=0,
        g=0,
    )
    sregs.ldt = kvm_segment(selector=0, type=2, present=0, unusable=1)
    sregs.gdt.base, sregs.gdt.limit = spec.gdt, spec.gdt_limit
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = longmode.CR0, spec.pml4, longmode.CR4, longmode.EFER
    sregs.cr2 = sregs.cr8 = 0
    regs = kvm_regs(rip=load_addr, rsp=long_mode_stack(spec.memory_bytes), rflags=RFLAGS_RESERVED)
    return regs, sregs


def describe_entry(load_addr: int, entry: str) -> dict[str, str]:
    """For `vm show` and logs."""
    if entry == "real":
        cs, ip = (0, load_addr) if load_addr <= 0xFFFF else (load_addr >> 4, load_addr & 0xF)
        return {"entry": "real", "cs:ip": f"{cs:04x}:{ip:04x}", "load_addr": f"{load_addr:#x}"}
    return {"entry": "long", "rip": f"{load_addr:#x}", "load_addr": f"{load_addr:#x}"}
