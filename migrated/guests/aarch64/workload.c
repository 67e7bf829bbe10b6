/* The arm64 workload guest: the x86_64 guest's loop, at EL1 with the MMU and caches on.
 *
 * Each vCPU verifies and rewrites its share of the working set at a rate the VMM sets (paced by
 * the generic counter, CNTVCT_EL0 at CNTFRQ_EL0, where the x86 guest uses the TSC) and reports
 * through its status page; the page format and the status words are the x86 guest's (abi.h,
 * page.h, shared). vCPU 0 also drives LPIs through the ITS (its.c) when the VMM asks for it.
 *
 * Interrupts stay masked in PSTATE (DAIF) throughout: LPIs are polled, not taken. An exception
 * ends in start.S's vectors, which record it in the status page and power the VM off.
 *
 * All state lives on this vCPU's stack or in guest RAM pages named by the parameter page, never in
 * globals: every vCPU runs this same image.
 */
#include <stdint.h>

#include "abi.h"
#include "abi_aarch64.h"
#include "cpu.h"
#include "gic.h"
#include "page.h"

typedef unsigned __int128 u128;

/* start.S checks the parameter page's magic against this before it trusts the page. */
const u64 wla_params_magic = WL_PARAMS_MAGIC;

struct vcpu {
	const u64 *params;
	u64 *status;
	u32 *gen;
	u64 index;
	u64 ws_base;
	u64 first;   /* global index of this vCPU's first page */
	u64 count;   /* pages in its share */
	u64 seed;
	u64 hz;      /* counter ticks per second */
	u64 hb_ticks;
	u64 last_hb;
	u64 written; /* pages written since start */
	/* Rate limiter: allowed to have written base + rate * (now - t0) / hz pages. */
	u64 rate;
	u64 t0;
	u64 base;
	struct lpi lpi; /* vCPU 0 only; lpi.ready = 0 elsewhere */
};

/* The VMM changes parameters while we run: always load them from memory. */
static inline u64 param(const struct vcpu *v, int word)
{
	return __atomic_load_n(&v->params[word], __ATOMIC_ACQUIRE);
}

static inline void report(struct vcpu *v, int word, u64 value)
{
	__atomic_store_n(&v->status[word], value, __ATOMIC_RELEASE);
}

static inline u64 reported(const struct vcpu *v, int word)
{
	return __atomic_load_n(&v->status[word], __ATOMIC_RELAXED);
}

/* Heartbeat and interrupt work; returns the counter value it read. */
static u64 tick(struct vcpu *v)
{
	u64 now = counter();
	if (now - v->last_hb >= v->hb_ticks) {
		v->last_hb = now;
		report(v, WL_S_HEARTBEAT, reported(v, WL_S_HEARTBEAT) + 1);
	}
	lpi_poll(&v->lpi, now);
	return now;
}

/* Waits until one more page is allowed at the current rate (re-read on every call). A deficit of
 * more than ~10 ms worth of pages (after a pause by the VMM, or a rate above what the vCPU can do)
 * is forgiven rather than caught up in a burst. Returns 0 instead if a continuous sweep should end
 * because the mode changed (so an idle vCPU still notices a switch to passes). */
static int throttle(struct vcpu *v, u64 mode)
{
	for (;;) {
		if (mode == WL_MODE_CONTINUOUS && param(v, WL_P_MODE) != mode)
			return 0;
		u64 rate = param(v, WL_P_RATE);
		u64 now = tick(v);
		if (rate != v->rate) {
			v->rate = rate;
			v->t0 = now;
			v->base = v->written;
			report(v, WL_S_RATE_SEEN, rate);
		}
		if (rate == WL_RATE_UNLIMITED) {
			report(v, WL_S_STATE, WL_STATE_WRITING);
			return 1;
		}
		if (rate != 0) {
			u64 done = v->written - v->base;
			u128 budget = (u128)rate * (now - v->t0);
			u64 slack = rate / 100 + 1;
			if ((u128)(done + 1) * v->hz <= budget) {
				if ((u128)(done + slack) * v->hz < budget) {
					v->t0 = now;
					v->base = v->written;
				}
				report(v, WL_S_STATE, WL_STATE_WRITING);
				return 1;
			}
		}
		report(v, WL_S_STATE, rate ? WL_STATE_THROTTLED : WL_STATE_IDLE);
		cpu_relax();
	}
}

static void rewrite_page(struct vcpu *v, u64 index)
{
	u64 gpa = v->ws_base + index * WL_PAGE_SIZE;
	u64 *page = (u64 *)gpa; /* identity-mapped */
	u32 gen = __atomic_load_n(&v->gen[index], __ATOMIC_RELAXED);

	/* Marks the one page that may be torn if the VMM stops us mid-write (the host checker
	 * skips it; we finish it when we run again). */
	report(v, WL_S_BUSY_PAGE, index + 1);
	if (!wl_page_valid(page, gpa, index, gen, (u32)v->index)) {
		report(v, WL_S_VERIFY_ERRORS, reported(v, WL_S_VERIFY_ERRORS) + 1);
		report(v, WL_S_LAST_ERROR_GEN, gen);
		report(v, WL_S_LAST_ERROR_GPA, gpa);
	}
	u32 next = gen + 1;
	if (next == 0) /* 0 means "never written" */
		next = 1;
	wl_fill_page(page, gpa, index, next, (u32)v->index, v->seed);
	__atomic_store_n(&v->gen[index], next, __ATOMIC_RELEASE);
	v->written++;
	report(v, WL_S_PAGES_WRITTEN, v->written);
	report(v, WL_S_BUSY_PAGE, 0);
}

/* One pass over the share. A continuous sweep stops early when the mode changes; a requested
 * pass always writes every page exactly once. */
static void sweep(struct vcpu *v, u64 mode)
{
	report(v, WL_S_SWEEP, reported(v, WL_S_SWEEP) + 1);
	for (u64 i = 0; i < v->count; i++) {
		if (!throttle(v, mode))
			return;
		rewrite_page(v, v->first + i);
	}
}

static int params_ok(const u64 *p, u64 index, u64 hz)
{
	return p[WL_P_VERSION] == WL_VERSION && p[WLA_P_VERSION] == WLA_VERSION &&
	       index < p[WL_P_NVCPUS] && p[WL_P_WS_PAGES] >= p[WL_P_NVCPUS] && hz >= 1000 &&
	       p[WL_P_WS_BASE] % WL_PAGE_SIZE == 0 && p[WL_P_STATUS_BASE] % WL_PAGE_SIZE == 0 &&
	       p[WL_P_GEN_BASE] % 4 == 0;
}

__attribute__((noreturn, used)) void workload_main(u64 index, const u64 *params)
{
	u64 hz = params[WL_P_TSC_HZ];
	if (hz == 0)
		hz = read_sysreg(cntfrq_el0) & 0xffffffff;

	struct vcpu v = {
		.params = params,
		.status = (u64 *)(params[WL_P_STATUS_BASE] + index * WL_PAGE_SIZE),
		.gen = (u32 *)params[WL_P_GEN_BASE],
		.index = index,
		.ws_base = params[WL_P_WS_BASE],
		.seed = params[WL_P_SEED],
		.hz = hz,
	};
	report(&v, WL_S_VCPU, index);
	report(&v, WLA_S_VERSION, WLA_VERSION);
	report(&v, WLA_S_COUNTER_HZ, hz);
	report(&v, WLA_S_MPIDR, read_sysreg(mpidr_el1));
	report(&v, WL_S_MAGIC, WL_STATUS_MAGIC);
	if (!params_ok(params, index, hz)) {
		report(&v, WL_S_STATE, WL_STATE_BAD_PARAMS);
		for (u64 spins = 0;; spins++) {
			if (spins % 4096 == 0)
				report(&v, WL_S_HEARTBEAT, reported(&v, WL_S_HEARTBEAT) + 1);
			cpu_relax();
		}
	}

	u64 n = params[WL_P_NVCPUS], pages = params[WL_P_WS_PAGES];
	/* Contiguous shares: vCPU i owns [i * pages / n, (i + 1) * pages / n). */
	v.first = index * pages / n;
	v.count = (index + 1) * pages / n - v.first;
	v.hb_ticks = hz / 1000;
	v.last_hb = counter();
	v.rate = param(&v, WL_P_RATE);
	v.t0 = v.last_hb;
	report(&v, WL_S_FIRST_PAGE, v.first);
	report(&v, WL_S_PAGE_COUNT, v.count);
	report(&v, WL_S_RATE_SEEN, v.rate);
	if (index == 0 && (params[WLA_P_FEATURES] & WLA_F_ITS))
		lpi_setup(&v.lpi, v.status, params, hz);

	for (;;) {
		u64 mode = param(&v, WL_P_MODE);
		if (mode != WL_MODE_PASSES) {
			sweep(&v, WL_MODE_CONTINUOUS);
			continue;
		}
		u64 done = reported(&v, WL_S_PASSES_DONE);
		if (param(&v, WL_P_PASS_REQ) > done) {
			sweep(&v, WL_MODE_PASSES);
			report(&v, WL_S_PASSES_DONE, done + 1);
			continue;
		}
		report(&v, WL_S_STATE, WL_STATE_PASS_WAIT);
		tick(&v);
		cpu_relax();
	}
}
