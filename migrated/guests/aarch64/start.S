/* Entry, at the first byte of the image (the VMM sets PC here). The VMM hands over
 * x0 = vCPU index, x1 = parameter page, at EL1h with DAIF masked and the MMU off.
 *
 * Why the MMU goes on: with it off every data access is Device-nGnRnE, non-cacheable, while the
 * VMM reads and copies guest RAM through cacheable mappings; on hardware without stage-2 forced
 * write-back (FEAT_S2FWB) the two views are not coherent, so the VMM could read stale status pages
 * and migrate stale working-set pages. With an identity map and caches on, guest and VMM share
 * coherent, cacheable memory (and the page loop runs at normal-memory speed, with no alignment or
 * exclusive-access restrictions). The map is one constant level-1 table in the image, identity,
 * 1 GiB blocks: [0, 1 GiB) Device-nGnRE (the GIC and any MMIO), [1 GiB, 512 GiB) Normal
 * write-back, inner shareable (RAM starts at 1 GiB). Nothing writes the table: vCPUs share it.
 */
#include "abi.h"
#include "abi_aarch64.h"

#define MAIR_DEVICE_nGnRE 0x04
#define MAIR_NORMAL_WB 0xff
#define MAIR_VALUE ((MAIR_NORMAL_WB << 8) | MAIR_DEVICE_nGnRE) /* attr0 device, attr1 normal */

/* Level-1 block descriptors (4 KiB granule, 1 GiB blocks). */
#define PTE_BLOCK 0x1
#define PTE_ATTR(i) ((i) << 2)
#define PTE_SH_INNER (3 << 8)
#define PTE_AF (1 << 10)
#define PTE_PXN (1 << 53)
#define PTE_UXN (1 << 54)
#define BLOCK_DEVICE (PTE_BLOCK | PTE_ATTR(0) | PTE_AF | PTE_PXN | PTE_UXN)
#define BLOCK_NORMAL (PTE_BLOCK | PTE_ATTR(1) | PTE_SH_INNER | PTE_AF | PTE_UXN)

/* TCR_EL1: T0SZ 25 (39-bit VA, walks start at level 1), inner/outer write-back
 * write-allocate, inner shareable, 4 KiB granule; TTBR1 walks disabled (EPD1), TG1 4 KiB.
 * IPS is filled in from ID_AA64MMFR0_EL1.PARange. */
#define TCR_T0SZ 25
#define TCR_IRGN0_WBWA (1 << 8)
#define TCR_ORGN0_WBWA (1 << 10)
#define TCR_SH0_INNER (3 << 12)
#define TCR_EPD1 (1 << 23)
#define TCR_TG1_4K (2 << 30)
#define TCR_VALUE (TCR_T0SZ | TCR_IRGN0_WBWA | TCR_ORGN0_WBWA | TCR_SH0_INNER | TCR_EPD1 | TCR_TG1_4K)

#define SCTLR_M (1 << 0)
#define SCTLR_A (1 << 1)
#define SCTLR_C (1 << 2)
#define SCTLR_I (1 << 12)
#define SCTLR_WXN (1 << 19)
#define SCTLR_EE (1 << 25)

#define PSCI_SYSTEM_OFF 0x84000008

	.section .text.start, "ax"
	.globl _start
	.type _start, %function
_start:
	msr	daifset, #0xf
	adr	x9, vectors
	msr	vbar_el1, x9
	msr	tpidr_el1, xzr          /* the fault handler's status page: none yet */
	isb
	mov	x19, x0
	mov	x20, x1

	/* The parameter page must be ours before any address in it is used (MMU off: aligned
	 * 8-byte loads only). */
	ldr	x9, [x20, #8 * WL_P_MAGIC]
	ldr	x10, wla_params_magic
	cmp	x9, x10
	b.ne	park                    /* nowhere to report: spin, no heartbeat */
	ldr	x9, [x20, #8 * WL_P_STATUS_BASE]
	add	x9, x9, x19, lsl #12
	msr	tpidr_el1, x9

	/* MMU on: attributes, translation control, the table, then SCTLR. */
	ldr	x9, =MAIR_VALUE
	msr	mair_el1, x9
	mrs	x10, id_aa64mmfr0_el1
	and	x10, x10, #7            /* PARange */
	cmp	x10, #5
	mov	x11, #5
	csel	x10, x10, x11, ls       /* 48 bits is plenty for 512 GiB */
	ldr	x9, =TCR_VALUE
	orr	x9, x9, x10, lsl #32    /* IPS */
	msr	tcr_el1, x9
	adrp	x9, l1_table
	msr	ttbr0_el1, x9
	isb
	tlbi	vmalle1
	dsb	nsh
	isb
	mrs	x9, sctlr_el1
	mov	x10, #(SCTLR_M | SCTLR_C)
	orr	x10, x10, #SCTLR_I
	orr	x9, x9, x10
	mov	x10, #(SCTLR_A)
	orr	x10, x10, #SCTLR_WXN
	orr	x10, x10, #SCTLR_EE
	bic	x9, x9, x10
	msr	sctlr_el1, x9
	isb

	/* This vCPU's stack: [STACK_BASE + i * STACK_SIZE, + STACK_SIZE), full descending. */
	ldr	x9, [x20, #8 * WLA_P_STACK_BASE]
	ldr	x10, [x20, #8 * WLA_P_STACK_SIZE]
	add	x11, x19, #1
	madd	x9, x11, x10, x9
	and	x9, x9, #~15
	mov	sp, x9
	mov	x29, xzr
	mov	x30, xzr
	mov	x0, x19
	mov	x1, x20
	bl	workload_main
park:
	yield                           /* workload_main never returns */
	b	park
	.size _start, . - _start
	.ltorg

/* Exception vectors: 16 slots of 0x80 bytes. Nothing is expected here (interrupts are masked,
 * the code takes no faults); any exception records ESR/ELR/FAR and the slot in the status page,
 * sets the state to WLA_STATE_FAULT and powers the VM off through PSCI, so the VMM sees it. */
	.section .text.vectors, "ax"
	.balign 2048
	.globl vectors
vectors:
	.irp slot, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
	.balign 128
	mov	x9, #\slot
	b	fault
	.endr
fault:
	mrs	x10, tpidr_el1
	cbz	x10, 1f
	mrs	x11, esr_el1
	str	x11, [x10, #8 * WLA_S_FAULT_ESR]
	mrs	x11, elr_el1
	str	x11, [x10, #8 * WLA_S_FAULT_ELR]
	mrs	x11, far_el1
	str	x11, [x10, #8 * WLA_S_FAULT_FAR]
	str	x9, [x10, #8 * WLA_S_FAULT_VECTOR]
	mov	x11, #WLA_STATE_FAULT
	str	x11, [x10, #8 * WL_S_STATE]
	dsb	sy
1:	ldr	x0, =PSCI_SYSTEM_OFF
	hvc	#0
2:	yield
	b	2b
	.ltorg

/* The identity map (see the top of this file). */
	.section .rodata.l1_table, "a"
	.balign 4096
	.globl l1_table
l1_table:
	.quad	BLOCK_DEVICE
	.set	gib, 1
	.rept	511
	.quad	(gib << 30) | BLOCK_NORMAL
	.set	gib, gib + 1
	.endr

	.section .note.GNU-stack, "", %progbits
