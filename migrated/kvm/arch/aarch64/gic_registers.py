"""The vGIC's registers a saved state carries, and the orders they are restored in: offsets from
the GICv3 architecture, access rules from arm-vgic-v3.rst ("All distributor regs are (rw,
32-bit) ... 64-bit registers must be accessed by separately accessing the lower and higher
word."), the ITS restore sequence from arm-vgic-its.rst."""

from __future__ import annotations


GICD_CTLR = 0x0000


GICD_IIDR = 0x0008


GICD_IGROUPR = 0x0080


GICD_ISENABLER = 0x0100


GICD_ICENABLER = 0x0180


GICD_ISPENDR = 0x0200


GICD_ISACTIVER = 0x0300


GICD_ICACTIVER = 0x0380


GICD_IPRIORITYR = 0x0400


GICD_ICFGR = 0x0C00


GICD_IROUTER = 0x6000


GICR_CTLR = 0x0000


GICR_PROPBASER = 0x0070


GICR_PENDBASER = 0x0078


GICR_SGI_BASE = 0x1_0000


GICR_IGROUPR0 = GICR_SGI_BASE + 0x0080


GICR_ISENABLER0 = GICR_SGI_BASE + 0x0100


GICR_ICENABLER0 = GICR_SGI_BASE + 0x0180


GICR_ISPENDR0 = GICR_SGI_BASE + 0x0200


GICR_ISACTIVER0 = GICR_SGI_BASE + 0x0300


GICR_ICACTIVER0 = GICR_SGI_BASE + 0x0380


GICR_IPRIORITYR0 = GICR_SGI_BASE + 0x0400


GICR_ICFGR0 = GICR_SGI_BASE + 0x0C00


GICR_ICFGR1 = GICR_SGI_BASE + 0x0C04


def spi_words(base: int, nr_irqs: int, bits_per_irq: int) -> list[int]:
    """Offsets of a per-IRQ register array's 32-bit words that cover the SPIs (32..nr_irqs):
    the first 32 interrupts are the redistributors' (RAZ/WI in the distributor)."""
    per_word = 32 // bits_per_irq
    return [base + 4 * (irq // per_word) for irq in range(32, nr_irqs, per_word)]


def dist_restore_order(nr_irqs: int) -> list[int]:
    """Every distributor register saved, in the order it is restored.

    GICD_IIDR first: arm-vgic-v3.rst "Userspace should set GICD_IIDR before setting any other
    registers to ensure the expected behavior." Then groups, priorities, routing and trigger
    configuration; enables, pending and active state after them; GICD_CTLR (enable) last.
    """
    return [
        GICD_IIDR,
        *spi_words(GICD_IGROUPR, nr_irqs, 1),
        *spi_words(GICD_IPRIORITYR, nr_irqs, 8),
        # GICD_IROUTER<n> is 64-bit: its lower and higher words one after the other.
        *(GICD_IROUTER + 8 * irq + half for irq in range(32, nr_irqs) for half in (0, 4)),
        *spi_words(GICD_ICFGR, nr_irqs, 2),
        *spi_words(GICD_ISENABLER, nr_irqs, 1),
        *spi_words(GICD_ISPENDR, nr_irqs, 1),
        *spi_words(GICD_ISACTIVER, nr_irqs, 1),
        GICD_CTLR,
    ]


def redist_restore_order() -> list[int]:
    """Every redistributor register saved (per vCPU), in the order it is restored.

    PROPBASER and PENDBASER before GICR_CTLR: KVM ignores writes to them once EnableLPIs is set
    ("Storing a value with LPIs already enabled is undefined"), and setting EnableLPIs reads the
    pending table from guest RAM (which is why memory comes first, R9).
    """
    return [
        GICR_PROPBASER,
        GICR_PROPBASER + 4,
        GICR_PENDBASER,
        GICR_PENDBASER + 4,
        GICR_IGROUPR0,
        *(GICR_IPRIORITYR0 + 4 * n for n in range(8)),
        GICR_ICFGR0,
        GICR_ICFGR1,
        GICR_ISENABLER0,
        GICR_ISPENDR0,
        GICR_ISACTIVER0,
        GICR_CTLR,
    ]


# "Set" registers whose architectural write only sets bits: restoring one clears first through
# its "clear" twin (uaccess writes of ICENABLER/ICACTIVER clear the bits written as 1).
# GICD_ISPENDR/GICR_ISPENDR0 are exact through this interface ("get/set the value of the latched
# pending state") and their ICPENDR twins are RAZ/WI, so they have none.
CLEAR_TWIN = {GICR_ISENABLER0: GICR_ICENABLER0, GICR_ISACTIVER0: GICR_ICACTIVER0}


def dist_clear_twin(offset: int) -> int | None:
    for set_base, clear_base in (
        (GICD_ISENABLER, GICD_ICENABLER),
        (GICD_ISACTIVER, GICD_ICACTIVER),
    ):
        if set_base <= offset < set_base + 0x80:
            return clear_base + offset - set_base
    return None


def _sysreg_instr(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    # arm-vgic-v3.rst, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS: "| Op 0 | Op1 | CRn | CRm | Op2 |"
    # in bits 15..14, 13..11, 10..7, 6..3, 2..0.
    return op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2


ICC_PMR_EL1 = _sysreg_instr(3, 0, 4, 6, 0)


ICC_BPR0_EL1 = _sysreg_instr(3, 0, 12, 8, 3)


ICC_AP0R_EL1 = tuple(_sysreg_instr(3, 0, 12, 8, 4 + n) for n in range(4))


ICC_AP1R_EL1 = tuple(_sysreg_instr(3, 0, 12, 9, n) for n in range(4))


ICC_BPR1_EL1 = _sysreg_instr(3, 0, 12, 12, 3)


ICC_CTLR_EL1 = _sysreg_instr(3, 0, 12, 12, 4)


ICC_SRE_EL1 = _sysreg_instr(3, 0, 12, 12, 5)


ICC_IGRPEN0_EL1 = _sysreg_instr(3, 0, 12, 12, 6)


ICC_IGRPEN1_EL1 = _sysreg_instr(3, 0, 12, 12, 7)


ICC_CTLR_PRIBITS_SHIFT = 8


ICC_NAMES = {
    ICC_PMR_EL1: "ICC_PMR_EL1",
    ICC_BPR0_EL1: "ICC_BPR0_EL1",
    **{reg: f"ICC_AP0R{n}_EL1" for n, reg in enumerate(ICC_AP0R_EL1)},
    **{reg: f"ICC_AP1R{n}_EL1" for n, reg in enumerate(ICC_AP1R_EL1)},
    ICC_BPR1_EL1: "ICC_BPR1_EL1",
    ICC_CTLR_EL1: "ICC_CTLR_EL1",
    ICC_SRE_EL1: "ICC_SRE_EL1",
    ICC_IGRPEN0_EL1: "ICC_IGRPEN0_EL1",
    ICC_IGRPEN1_EL1: "ICC_IGRPEN1_EL1",
}


def icc_restore_order(icc_ctlr: int) -> list[int]:
    """The CPU interface registers, in the order they are restored: SRE first (KVM refuses a
    write without its SRE bit), CTLR next (its PRIbits decide how many active-priority
    registers exist), the group enables last. ICC_AP<n>R<m>_EL1 exist for m < 1, 2 or 4 as
    the CPU interface implements 5, 6 or 7 priority bits (KVM answers EINVAL beyond)."""
    pri_bits = ((icc_ctlr >> ICC_CTLR_PRIBITS_SHIFT) & 0x7) + 1
    aprs = 4 if pri_bits >= 7 else 2 if pri_bits == 6 else 1
    return [
        ICC_SRE_EL1,
        ICC_CTLR_EL1,
        ICC_PMR_EL1,
        ICC_BPR0_EL1,
        ICC_BPR1_EL1,
        *ICC_AP0R_EL1[:aprs],
        *ICC_AP1R_EL1[:aprs],
        ICC_IGRPEN0_EL1,
        ICC_IGRPEN1_EL1,
    ]


GITS_CTLR = 0x0000


GITS_IIDR = 0x0004


GITS_CBASER = 0x0080


GITS_CWRITER = 0x0088


GITS_CREADR = 0x0090


GITS_BASER = tuple(0x0100 + 8 * n for n in range(8))


ITS_NAMES = {
    GITS_CTLR: "GITS_CTLR",
    GITS_IIDR: "GITS_IIDR",
    GITS_CBASER: "GITS_CBASER",
    GITS_CWRITER: "GITS_CWRITER",
    GITS_CREADR: "GITS_CREADR",
    **{reg: f"GITS_BASER{n}" for n, reg in enumerate(GITS_BASER)},
}


# arm-vgic-its.rst "ITS Restore Sequence": "1. Restore GITS_CBASER 2. Restore all other GITS_
# registers, except GITS_CTLR! 3. Load the ITS table data (KVM_DEV_ARM_ITS_RESTORE_TABLES)
# 4. Restore GITS_CTLR". Within step 2: GITS_IIDR "must be restored before calling
# KVM_DEV_ARM_ITS_RESTORE_TABLES" (its Revision field is the table ABI); GITS_CREADR "must be
# restored after GITS_CBASER since a write to GITS_CBASER resets GITS_CREADR".
ITS_REGS_BEFORE_TABLES = (GITS_CBASER, GITS_IIDR, GITS_CREADR, GITS_CWRITER, *GITS_BASER)


ITS_SAVED = frozenset((*ITS_REGS_BEFORE_TABLES, GITS_CTLR))
