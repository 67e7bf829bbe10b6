/* The x86 "small OS" mode of the workload guest: its additions to the guest/VMM contract.
 *
 * Words 0-31 of both pages are abi.h's (shared with arm64), 32-63 are arm64's (WLA_*); the x86
 * small OS uses words 64 and up, named WLX_*. Mirrored by migrated/guests/abi.py (WLX_*), and
 * tests/guests/test_smallos_kvm.py fails if the two disagree. With WLX_P_FLAGS = 0 (what a VMM
 * that knows nothing of this file writes) the guest is the plain CPL3 workload, unchanged.
 *
 * No integer suffixes: start.S includes this file too.
 */
#ifndef WLX_ABI_H
#define WLX_ABI_H

/* Parameter page (VMM-written). */
#define WLX_P_FLAGS 64          /* WLX_F_*; read once at boot */
#define WLX_P_TICK_HZ 65        /* LAPIC timer interrupts per second, every vCPU */
#define WLX_P_APIC_HZ 66        /* LAPIC timer input clock (KVM: 1 GHz) */
#define WLX_P_PIT_HZ 67         /* PIT channel 0 rate on vCPU 0; 0: PIT left alone */
#define WLX_P_IRQ_PIN 68        /* IOAPIC pin the VMM pulses (KVM_IRQ_LINE); routed to vCPU 0 */
#define WLX_P_USER_STACKS 69    /* vCPU i's CPL3 stack top: USER_STACKS + (i + 1) * USER_STACK_SIZE */
#define WLX_P_USER_STACK_SIZE 70

#define WLX_F_SMALLOS 1         /* the VMM starts every vCPU at CPL0 in the kernel entry */

/* Status page (guest-written). */
#define WLX_S_KSTATE 64         /* WLX_K_* */
#define WLX_S_FEATURES 65       /* WLX_FEAT_*: what the CPL3 checks cover */
#define WLX_S_TICKS 66          /* LAPIC timer interrupts taken */
#define WLX_S_IPIS 67           /* IPIs received (vector WLX_VEC_IPI) */
#define WLX_S_IPIS_SENT 68      /* vCPU 0: IPIs sent to the others */
#define WLX_S_IRQS 69           /* vCPU 0: IOAPIC interrupts of the VMM-pulsed pin */
#define WLX_S_PIT_TICKS 70      /* vCPU 0: PIT interrupts (IOAPIC pin 0, KVM default routing) */
#define WLX_S_UNEXPECTED 71     /* interrupts on vectors nobody programmed */
#define WLX_S_LAST_UNEXPECTED 72
#define WLX_S_FAULTS 73         /* CPU exceptions; the vCPU then stops working (sti; hlt) */
#define WLX_S_FAULT_VECTOR 74
#define WLX_S_FAULT_ERROR 75
#define WLX_S_FAULT_RIP 76
#define WLX_S_FAULT_CR2 77
#define WLX_S_MSR_CHECKS 78     /* sentinel MSR reads (each tick) */
#define WLX_S_MSR_MISMATCHES 79
#define WLX_S_MSR_LAST_BAD 80   /* index of the last MSR that did not hold its sentinel */
#define WLX_S_REG_CHECKS 81     /* CPL3 register re-checks */
#define WLX_S_REG_MISMATCHES 82 /* re-checks that found any register changed */
#define WLX_S_REG_BAD_MASK 83   /* WLX_R_*: which classes differed, accumulated */
#define WLX_S_CLOCK_READS 84    /* kvmclock reads at CPL3 */
#define WLX_S_CLOCK_REGRESSIONS 85
#define WLX_S_CLOCK_NS 86       /* last kvmclock value read */
#define WLX_S_ATOMIC_OWN 87     /* this vCPU's lock xadd count */
#define WLX_S_ATOMIC_SHARED 88  /* vCPU 0's page only: every vCPU's lock xadd target */
#define WLX_S_ATOMIC_CHECKS 89
#define WLX_S_ATOMIC_VIOLATIONS 90
#define WLX_S_FS_SELF 91        /* holds its own GPA; FS base points here */
#define WLX_S_REG_GEN 92        /* generation of the register values now loaded */
#define WLX_S_PVCLOCK 96        /* words 96-99: this vCPU's kvmclock (pvclock_vcpu_time_info) */

#define WLX_K_NONE 0
#define WLX_K_KERNEL 1          /* kernel entry reached */
#define WLX_K_USER 2            /* CPL3 workload running with its checks */

#define WLX_FEAT_X87_SSE 1
#define WLX_FEAT_AVX 2
#define WLX_FEAT_AVX512 4
#define WLX_FEAT_KVMCLOCK 8

#define WLX_R_X87 1
#define WLX_R_XMM 2
#define WLX_R_YMM 4
#define WLX_R_ZMM 8
#define WLX_R_K 16
#define WLX_R_MXCSR 32
#define WLX_R_FS 64

/* Interrupt vectors. */
#define WLX_VEC_TIMER 0x40
#define WLX_VEC_IPI 0x41
#define WLX_VEC_PIT 0x42
#define WLX_VEC_IRQ 0x44
#define WLX_VEC_SPURIOUS 0xff

/* Fixed facts the kernel relies on (layout.py keeps them; a test checks). */
#define WLX_KERNEL_ENTRY_OFFSET 0x40   /* kernel entry: CODE_BASE + this */
#define WLX_KSTACK_SIZE 0x4000         /* kernel stacks are this big and aligned */
#define WLX_IDT_GPA 0x4000
#define WLX_IOAPIC_GPA 0xfec00000
#define WLX_PIT_HZ_INPUT 1193182

/* Sentinel MSR values: base | vCPU index (all canonical / 32-bit where the MSR needs it). */
#define WLX_SENTINEL_KERNEL_GS_BASE 0x00007e5700000000
#define WLX_SENTINEL_SYSENTER_ESP 0x5e470000
#define WLX_SENTINEL_LSTAR 0x00007e5800000000
#define WLX_SENTINEL_STAR 0x0023000857a50000

#endif
