/* The small OS's CPL0 part in C (abi_smallos.h): boot of each vCPU (IDT, x2APIC timer, IOAPIC,
 * PIT, kvmclock, FS base, sentinel MSRs) and the interrupt handler. Included by workload.c.
 *
 * PVM emulates all of this (HOST-NOTES: ~1-2 M instructions/s), so it stays short: boot runs
 * once, a tick is a few dozen instructions and four rdmsr. Per-vCPU kernel data sits at the
 * bottom of the vCPU's kernel stack (stacks are WLX_KSTACK_SIZE big and aligned); nothing is
 * global. */
#include "abi_smallos.h"

#define MSR_APIC_BASE 0x1b
#define MSR_SYSENTER_ESP 0x175
#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_FS_BASE 0xc0000100
#define MSR_KERNEL_GS_BASE 0xc0000102
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define X2APIC_TPR 0x808
#define X2APIC_EOI 0x80b
#define X2APIC_SVR 0x80f
#define X2APIC_ICR 0x830
#define X2APIC_LVT_TIMER 0x832
#define X2APIC_LVT_LINT0 0x835
#define X2APIC_LVT_LINT1 0x836
#define X2APIC_LVT_ERROR 0x837
#define X2APIC_TIMER_INIT 0x838
#define X2APIC_TIMER_DIV 0x83e
#define LVT_MASKED 0x10000
#define LVT_PERIODIC 0x20000
#define ICR_ALL_BUT_SELF 0xc0000
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10

struct kframe { /* what isr_common leaves on the stack, lowest address first */
	u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

struct kcpu {
	u64 index;
	u64 nvcpus;
	volatile u64 *status;
};

extern char isr_stubs[];
extern char kernel_park[];

static inline struct kcpu *this_kcpu(void)
{
	u64 sp;
	__asm__ volatile("movq %%rsp, %0" : "=r"(sp));
	return (struct kcpu *)(sp & ~(u64)(WLX_KSTACK_SIZE - 1));
}

static inline u64 rdmsr(u32 index)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(index));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 index, u64 value)
{
	__asm__ volatile("wrmsr" ::"c"(index), "a"((u32)value), "d"((u32)(value >> 32)) : "memory");
}

static inline void outb(u16 port, u8 value)
{
	__asm__ volatile("outb %0, %1" ::"a"(value), "Nd"(port));
}

static void ioapic_write(u32 reg, u32 value)
{
	volatile u32 *io = (volatile u32 *)WLX_IOAPIC_GPA;
	io[0] = reg;  /* IOREGSEL */
	io[4] = value; /* IOWIN */
}

/* Fixed delivery, physical destination APIC ID 0, edge, active high, unmasked. */
static void ioapic_route(u32 pin, u32 vector)
{
	ioapic_write(0x11 + 2 * pin, 0);
	ioapic_write(0x10 + 2 * pin, vector);
}

static u64 sentinel(u32 msr, u64 index)
{
	switch (msr) {
	case MSR_KERNEL_GS_BASE: return WLX_SENTINEL_KERNEL_GS_BASE | index << 12;
	case MSR_SYSENTER_ESP: return WLX_SENTINEL_SYSENTER_ESP | index;
	case MSR_LSTAR: return WLX_SENTINEL_LSTAR | index << 12;
	default: return WLX_SENTINEL_STAR | index; /* MSR_STAR */
	}
}

static const u32 sentinel_msrs[4] = {MSR_KERNEL_GS_BASE, MSR_SYSENTER_ESP, MSR_LSTAR, MSR_STAR};

/* Returns this vCPU's CPL3 stack top; kernel.S then drops to _start at CPL3 with IF=1. */
__attribute__((used)) u64 kernel_main(u64 index, const u64 *params)
{
	struct kcpu *k = this_kcpu();
	k->index = index;
	k->nvcpus = params[WL_P_NVCPUS];
	k->status = (volatile u64 *)(params[WL_P_STATUS_BASE] + index * WL_PAGE_SIZE);
	volatile u64 *s = k->status;
	s[WLX_S_KSTATE] = WLX_K_KERNEL;

	/* IDT: every vCPU writes the same table (same values, so the races are harmless). */
	volatile u64 *idt = (volatile u64 *)WLX_IDT_GPA;
	for (u64 v = 0; v < 256; v++) {
		u64 handler = (u64)isr_stubs + 16 * v;
		idt[2 * v] = (handler & 0xffff) | (u64)KERNEL_CS << 16 | (u64)0x8e << 40 |
			     (handler >> 16 & 0xffff) << 48;
		idt[2 * v + 1] = handler >> 32;
	}
	struct __attribute__((packed)) {
		u16 limit;
		u64 base;
	} idtr = {256 * 16 - 1, WLX_IDT_GPA};
	__asm__ volatile("lidt %0" ::"m"(idtr) : "memory");

	for (u64 i = 0; i < 4; i++)
		wrmsr(sentinel_msrs[i], sentinel(sentinel_msrs[i], index));
	/* FS base at a status word that holds its own address: CPL3 checks %fs:0. */
	u64 fs = (u64)&s[WLX_S_FS_SELF];
	s[WLX_S_FS_SELF] = fs;
	wrmsr(MSR_FS_BASE, fs);
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)&s[WLX_S_PVCLOCK] | 1);
	s[WLX_S_FEATURES] = WLX_FEAT_KVMCLOCK;

	/* x2APIC, LINT0/1 and errors masked, the periodic timer. */
	wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | 0xc00);
	wrmsr(X2APIC_SVR, 0x100 | WLX_VEC_SPURIOUS);
	wrmsr(X2APIC_TPR, 0);
	wrmsr(X2APIC_LVT_LINT0, LVT_MASKED);
	wrmsr(X2APIC_LVT_LINT1, LVT_MASKED);
	wrmsr(X2APIC_LVT_ERROR, LVT_MASKED);
	u64 hz = params[WLX_P_TICK_HZ];
	if (hz) {
		wrmsr(X2APIC_TIMER_DIV, 0x3); /* divide by 16 */
		wrmsr(X2APIC_LVT_TIMER, LVT_PERIODIC | WLX_VEC_TIMER);
		u64 count = params[WLX_P_APIC_HZ] / 16 / hz;
		wrmsr(X2APIC_TIMER_INIT, count ? count : 1);
	}

	if (index == 0) {
		outb(0x21, 0xff); /* both PICs masked: interrupts come through the IOAPIC only */
		outb(0xa1, 0xff);
		ioapic_route((u32)params[WLX_P_IRQ_PIN], WLX_VEC_IRQ);
		u64 pit = params[WLX_P_PIT_HZ];
		if (pit) {
			/* KVM's default routing takes the PIT's GSI 0 to IOAPIC pin 0 (pin 2 is the
			 * ISA override a VMM can install with KVM_SET_GSI_ROUTING; measured: pin 0). */
			ioapic_route(0, WLX_VEC_PIT);
			u64 count = WLX_PIT_HZ_INPUT / pit;
			count = count > 0xffff ? 0xffff : count ? count : 1;
			outb(0x43, 0x34); /* channel 0, lobyte/hibyte, mode 2 (rate generator) */
			outb(0x40, (u8)count);
			outb(0x40, (u8)(count >> 8));
		}
	}
	return params[WLX_P_USER_STACKS] + (index + 1) * params[WLX_P_USER_STACK_SIZE];
}

static inline void eoi(void)
{
	wrmsr(X2APIC_EOI, 0);
}

__attribute__((used)) void kernel_interrupt(struct kframe *f)
{
	struct kcpu *k = this_kcpu();
	volatile u64 *s = k->status;
	u64 v = f->vector;
	if (v < 32) { /* an exception: record it and park this vCPU (interrupts still counted) */
		u64 cr2;
		__asm__ volatile("movq %%cr2, %0" : "=r"(cr2));
		s[WLX_S_FAULT_VECTOR] = v;
		s[WLX_S_FAULT_ERROR] = f->error;
		s[WLX_S_FAULT_RIP] = f->rip;
		s[WLX_S_FAULT_CR2] = cr2;
		s[WLX_S_FAULTS] = s[WLX_S_FAULTS] + 1;
		f->rip = (u64)kernel_park;
		f->cs = KERNEL_CS;
		f->ss = KERNEL_DS;
		f->rsp = (u64)f;
		f->rflags = 0x2;
		return;
	}
	switch (v) {
	case WLX_VEC_TIMER:
		s[WLX_S_TICKS] = s[WLX_S_TICKS] + 1;
		for (u64 i = 0; i < 4; i++) {
			u64 value = rdmsr(sentinel_msrs[i]);
			s[WLX_S_MSR_CHECKS] = s[WLX_S_MSR_CHECKS] + 1;
			if (value != sentinel(sentinel_msrs[i], k->index)) {
				s[WLX_S_MSR_MISMATCHES] = s[WLX_S_MSR_MISMATCHES] + 1;
				s[WLX_S_MSR_LAST_BAD] = sentinel_msrs[i];
			}
		}
		if (k->index == 0 && k->nvcpus > 1) {
			wrmsr(X2APIC_ICR, ICR_ALL_BUT_SELF | WLX_VEC_IPI);
			s[WLX_S_IPIS_SENT] = s[WLX_S_IPIS_SENT] + k->nvcpus - 1;
		}
		break;
	case WLX_VEC_IPI:
		s[WLX_S_IPIS] = s[WLX_S_IPIS] + 1;
		break;
	case WLX_VEC_PIT:
		s[WLX_S_PIT_TICKS] = s[WLX_S_PIT_TICKS] + 1;
		break;
	case WLX_VEC_IRQ:
		s[WLX_S_IRQS] = s[WLX_S_IRQS] + 1;
		break;
	case WLX_VEC_SPURIOUS: /* no EOI for the spurious vector */
		s[WLX_S_UNEXPECTED] = s[WLX_S_UNEXPECTED] + 1;
		s[WLX_S_LAST_UNEXPECTED] = v;
		return;
	default:
		s[WLX_S_UNEXPECTED] = s[WLX_S_UNEXPECTED] + 1;
		s[WLX_S_LAST_UNEXPECTED] = v;
		break;
	}
	eoi();
}
