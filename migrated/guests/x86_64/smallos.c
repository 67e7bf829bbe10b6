/* The small OS's CPL3 checks (abi_smallos.h), run by the workload loop about every millisecond:
 * the x87/SSE/AVX/AVX-512 registers, MXCSR and FS base hold what was last loaded; kvmclock never
 * goes back; lock xadd counters add up across vCPUs. Included by workload.c. The registers are
 * loaded and stored by regs.S; this C never touches them (-mgeneral-regs-only). */
#include "abi_smallos.h"

#define WLX_BUF_WORDS 272
#define WLX_VEC_WORD 16
#define WLX_ATOMIC_BURST 16

struct wlx {
	volatile u64 *status;
	volatile u64 *shared;   /* vCPU 0's status page */
	u64 stride;             /* status pages are one page apart */
	u64 index, nvcpus, seed, feat, gen, own, last_ns;
	u64 buf[WLX_BUF_WORDS] __attribute__((aligned(64)));
	u64 chk[WLX_BUF_WORDS] __attribute__((aligned(64)));
};

void wlx_regs_load(const u64 *buf, u64 feat);
void wlx_regs_store(u64 *buf, u64 feat);

struct pvclock {
	u32 version, pad0;
	u64 tsc_timestamp, system_time;
	u32 mul;
	int8_t shift;
	u8 flags, pad[2];
};

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static u64 wlx_features(void)
{
	u64 feat = WLX_FEAT_X87_SSE;
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	if (!(c & (1u << 27)) || !(c & (1u << 28))) /* OSXSAVE, AVX */
		return feat;
	u32 lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	if ((lo & 0x6) != 0x6)
		return feat;
	feat |= WLX_FEAT_AVX;
	cpuid(7, 0, &a, &b, &c, &d);
	if ((lo & 0xe0) == 0xe0 && (b & (1u << 16)) && (b & (1u << 30))) /* AVX512F, AVX512BW */
		feat |= WLX_FEAT_AVX512;
	return feat;
}

static void wlx_fill(struct wlx *x, u64 *buf, u64 gen)
{
	u64 base = x->seed ^ (x->index << 48) ^ (gen << 20) ^ WL_GOLDEN;
	for (u64 i = 0; i < 7; i++)
		buf[i] = wl_mix64(base + i) >> 2; /* 62-bit integers: exact in the x87's 64-bit mantissa */
	buf[7] = 0x1f80 | (gen & 3) << 13;    /* all exceptions masked; the rounding mode varies */
	for (u64 i = 8; i < WLX_VEC_WORD; i++)
		buf[i] = i < 15 ? wl_mix64(base + 100 + i) : 0;
	for (u64 i = WLX_VEC_WORD; i < WLX_BUF_WORDS; i++)
		buf[i] = wl_mix64(base + 1000 + i);
}

static u64 wlx_compare(struct wlx *x)
{
	u64 bad = 0;
	for (u64 i = 0; i < 7; i++)
		if (x->chk[i] != x->buf[i])
			bad |= WLX_R_X87;
	if ((u32)x->chk[7] != (u32)x->buf[7])
		bad |= WLX_R_MXCSR;
	u64 regs = x->feat & WLX_FEAT_AVX512 ? 32 : 16;
	for (u64 r = 0; r < regs; r++) {
		const u64 *want = &x->buf[WLX_VEC_WORD + 8 * r], *got = &x->chk[WLX_VEC_WORD + 8 * r];
		for (u64 w = 0; w < 8; w++) {
			if (w >= 4 && !(x->feat & WLX_FEAT_AVX512))
				break;
			if (w >= 2 && !(x->feat & WLX_FEAT_AVX))
				break;
			if (want[w] != got[w])
				bad |= r >= 16 || w >= 4 ? WLX_R_ZMM : w >= 2 ? WLX_R_YMM : WLX_R_XMM;
		}
	}
	if (x->feat & WLX_FEAT_AVX512)
		for (u64 i = 8; i < 15; i++)
			if (x->chk[i] != x->buf[i])
				bad |= WLX_R_K;
	u64 fs;
	__asm__ volatile("movq %%fs:0, %0" : "=r"(fs));
	if (fs != (u64)&x->status[WLX_S_FS_SELF])
		bad |= WLX_R_FS;
	return bad;
}

static u64 wlx_clock(const volatile struct pvclock *p, int *ok)
{
	u32 version;
	u64 ns;
	do {
		version = p->version;
		__asm__ volatile("" ::: "memory");
		u64 delta = rdtsc() - p->tsc_timestamp;
		int8_t shift = p->shift;
		delta = shift < 0 ? delta >> -shift : delta << shift;
		ns = p->system_time + (u64)(((u128)delta * p->mul) >> 32);
		__asm__ volatile("" ::: "memory");
	} while ((version & 1) || version != p->version);
	*ok = version != 0;
	return ns;
}

static inline u64 xadd(volatile u64 *p, u64 v)
{
	__asm__ volatile("lock xaddq %0, %1" : "+r"(v), "+m"(*p)::"memory");
	return v;
}

static void wlx_begin(struct wlx *x, u64 index, const u64 *params)
{
	x->status = (volatile u64 *)(params[WL_P_STATUS_BASE] + index * WL_PAGE_SIZE);
	x->shared = (volatile u64 *)params[WL_P_STATUS_BASE];
	x->stride = WL_PAGE_SIZE / 8;
	x->index = index;
	x->nvcpus = params[WL_P_NVCPUS];
	x->seed = params[WL_P_SEED];
	x->feat = wlx_features();
	x->gen = 1;
	x->own = 0;
	x->last_ns = 0;
	x->status[WLX_S_FEATURES] = x->status[WLX_S_FEATURES] | x->feat;
	wlx_fill(x, x->buf, x->gen);
	wlx_regs_load(x->buf, x->feat);
	x->status[WLX_S_REG_GEN] = x->gen;
	x->status[WLX_S_KSTATE] = WLX_K_USER;
}

static void wlx_check(struct wlx *x)
{
	volatile u64 *s = x->status;
	/* Registers: compare with the last generation, then load the next. */
	wlx_regs_store(x->chk, x->feat);
	u64 bad = wlx_compare(x);
	s[WLX_S_REG_CHECKS] = s[WLX_S_REG_CHECKS] + 1;
	if (bad) {
		s[WLX_S_REG_MISMATCHES] = s[WLX_S_REG_MISMATCHES] + 1;
		s[WLX_S_REG_BAD_MASK] = s[WLX_S_REG_BAD_MASK] | bad;
	}
	x->gen++;
	wlx_fill(x, x->buf, x->gen);
	wlx_regs_load(x->buf, x->feat);
	s[WLX_S_REG_GEN] = x->gen;

	/* kvmclock, read at CPL3 from this vCPU's pvclock page. */
	int ok;
	u64 ns = wlx_clock((const volatile struct pvclock *)&s[WLX_S_PVCLOCK], &ok);
	if (ok) {
		s[WLX_S_CLOCK_READS] = s[WLX_S_CLOCK_READS] + 1;
		if (ns < x->last_ns)
			s[WLX_S_CLOCK_REGRESSIONS] = s[WLX_S_CLOCK_REGRESSIONS] + 1;
		x->last_ns = ns;
		s[WLX_S_CLOCK_NS] = ns;
	}

	/* Atomics: own first, then shared, so sum(own) runs ahead of shared by at most one each. */
	for (u64 i = 0; i < WLX_ATOMIC_BURST; i++) {
		u64 old = xadd(&s[WLX_S_ATOMIC_OWN], 1);
		xadd(&x->shared[WLX_S_ATOMIC_SHARED], 1);
		if (old != x->own)
			s[WLX_S_ATOMIC_VIOLATIONS] = s[WLX_S_ATOMIC_VIOLATIONS] + 1;
		x->own = old + 1;
	}
	s[WLX_S_ATOMIC_CHECKS] = s[WLX_S_ATOMIC_CHECKS] + 1;
	if (x->index == 0) {
		u64 before = __atomic_load_n(&x->shared[WLX_S_ATOMIC_SHARED], __ATOMIC_SEQ_CST);
		u64 sum = 0;
		for (u64 v = 0; v < x->nvcpus; v++)
			sum += __atomic_load_n(&x->shared[v * x->stride + WLX_S_ATOMIC_OWN],
					       __ATOMIC_SEQ_CST);
		u64 after = __atomic_load_n(&x->shared[WLX_S_ATOMIC_SHARED], __ATOMIC_SEQ_CST);
		if (sum < before || sum > after + x->nvcpus)
			s[WLX_S_ATOMIC_VIOLATIONS] = s[WLX_S_ATOMIC_VIOLATIONS] + 1;
	}
}
