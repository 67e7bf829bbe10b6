/* Small arm64 helpers: system registers, the generic counter, barriers, MMIO.
 *
 * MMIO goes through single ldr/str instructions written in asm: KVM (and any hypervisor) can only
 * emulate a trapped access whose syndrome describes it (ESR_EL2.ISV = 1), which rules out
 * load/store pairs, writeback addressing and anything the compiler might merge or split.
 */
#ifndef WLA_CPU_H
#define WLA_CPU_H

#include <stdint.h>

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint8_t u8;

#define STR(x) #x
#define XSTR(x) STR(x)

#define read_sysreg(reg)                                                                   \
	({                                                                                 \
		u64 __v;                                                                   \
		__asm__ volatile("mrs %0, " XSTR(reg) : "=r"(__v)::"memory");              \
		__v;                                                                       \
	})

#define write_sysreg(reg, val)                                                             \
	__asm__ volatile("msr " XSTR(reg) ", %0" ::"r"((u64)(val)) : "memory")

/* GICv3 CPU interface, by encoding (older assemblers lack the names). */
#define ICC_PMR_EL1 S3_0_C4_C6_0
#define ICC_IAR1_EL1 S3_0_C12_C12_0
#define ICC_EOIR1_EL1 S3_0_C12_C12_1
#define ICC_BPR1_EL1 S3_0_C12_C12_3
#define ICC_CTLR_EL1 S3_0_C12_C12_4
#define ICC_SRE_EL1 S3_0_C12_C12_5
#define ICC_IGRPEN1_EL1 S3_0_C12_C12_7

static inline void isb(void)
{
	__asm__ volatile("isb" ::: "memory");
}

/* Normal-memory stores (tables, command queue) complete before the MMIO write that tells the
 * GIC to read them. */
static inline void dsb_sy(void)
{
	__asm__ volatile("dsb sy" ::: "memory");
}

static inline void cpu_relax(void)
{
	__asm__ volatile("yield" ::: "memory");
}

/* The virtual counter; the isb keeps the read from being hoisted above earlier work. */
static inline u64 counter(void)
{
	isb();
	return read_sysreg(cntvct_el0);
}

static inline u32 mmio_r32(u64 addr)
{
	u32 v;
	__asm__ volatile("ldr %w0, [%1]" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline u64 mmio_r64(u64 addr)
{
	u64 v;
	__asm__ volatile("ldr %0, [%1]" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline void mmio_w32(u64 addr, u32 v)
{
	__asm__ volatile("str %w0, [%1]" ::"r"(v), "r"(addr) : "memory");
}

static inline void mmio_w64(u64 addr, u64 v)
{
	__asm__ volatile("str %0, [%1]" ::"r"(v), "r"(addr) : "memory");
}

#endif
