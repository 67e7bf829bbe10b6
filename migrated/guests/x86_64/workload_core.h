/* The architecture-neutral core of the workload guest: per-vCPU state, the rate limiter, the
 * page rewrite and the sweep/pass loop. Shared, like abi.h and page.h, by x86_64/workload.c and
 * aarch64/workload.c, which first define `struct vcpu_arch` (their own per-vCPU extras), and after
 * including this `arch_tick()` (read the clock, beat the heart, do the architecture's periodic
 * work, return the clock) and `cpu_relax()`.
 *
 * All state lives on the vCPU's stack or in guest RAM pages named by the parameter page, never in
 * globals: every vCPU runs the same image.
 */
#ifndef MIGRATED_WORKLOAD_CORE_H
#define MIGRATED_WORKLOAD_CORE_H

#include "abi.h"
#include "page.h"

typedef unsigned __int128 u128;

struct vcpu {
	const u64 *params;
	u64 *status;
	u32 *gen;
	u64 index;
	u64 ws_base;
	u64 first;   /* global index of this vCPU's first page */
	u64 count;   /* pages in its share */
	u64 seed;
	u64 hz;      /* clock ticks per second (TSC, or the arm64 generic counter) */
	u64 hb_ticks;
	u64 last_hb;
	u64 written; /* pages written since start */
	/* Rate limiter: allowed to have written base + rate * (now - t0) / hz pages. */
	u64 rate;
	u64 t0;
	u64 base;
	struct vcpu_arch arch;
};

static u64 arch_tick(struct vcpu *v);
static inline void cpu_relax(void);

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

/* This vCPU's own rate where the VMM set one, the VM-wide rate otherwise. */
static inline u64 wanted_rate(const struct vcpu *v)
{
	u64 own = v->index < WL_VCPU_RATES ? param(v, WL_P_VCPU_RATE + (int)v->index) : 0;
	return own ? own : param(v, WL_P_RATE);
}

/* Returns 1 when a heartbeat was due (and given). */
static int heartbeat(struct vcpu *v, u64 now)
{
	if (now - v->last_hb < v->hb_ticks)
		return 0;
	v->last_hb = now;
	report(v, WL_S_HEARTBEAT, reported(v, WL_S_HEARTBEAT) + 1);
	return 1;
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
		u64 rate = wanted_rate(v);
		u64 now = arch_tick(v);
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
	u64 *page = (u64 *)gpa;
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

/* Parameters the guest cannot run with: say so, and keep a heartbeat so the VMM sees it alive. */
__attribute__((noreturn)) static void bad_params(struct vcpu *v)
{
	report(v, WL_S_STATE, WL_STATE_BAD_PARAMS);
	for (u64 spins = 0;; spins++) {
		if (spins % 4096 == 0)
			report(v, WL_S_HEARTBEAT, reported(v, WL_S_HEARTBEAT) + 1);
		cpu_relax();
	}
}

/* This vCPU's share and its clocks. Contiguous shares: vCPU i owns [i * pages / n,
 * (i + 1) * pages / n). (u64 is enough for any RAM the layouts accept, and a u128 division would
 * need libgcc.) */
static void start_share(struct vcpu *v, u64 now)
{
	u64 n = v->params[WL_P_NVCPUS], pages = v->params[WL_P_WS_PAGES];
	v->first = v->index * pages / n;
	v->count = (v->index + 1) * pages / n - v->first;
	v->hb_ticks = v->hz / 1000;
	v->last_hb = now;
	v->rate = wanted_rate(v);
	v->t0 = now;
	report(v, WL_S_FIRST_PAGE, v->first);
	report(v, WL_S_PAGE_COUNT, v->count);
	report(v, WL_S_RATE_SEEN, v->rate);
}

/* Continuous sweeps, or one pass per request, as the parameter page says. */
__attribute__((noreturn)) static void run_workload(struct vcpu *v)
{
	for (;;) {
		u64 mode = param(v, WL_P_MODE);
		if (mode != WL_MODE_PASSES) {
			sweep(v, WL_MODE_CONTINUOUS);
			continue;
		}
		u64 done = reported(v, WL_S_PASSES_DONE);
		if (param(v, WL_P_PASS_REQ) > done) {
			sweep(v, WL_MODE_PASSES);
			report(v, WL_S_PASSES_DONE, done + 1);
			continue;
		}
		report(v, WL_S_STATE, WL_STATE_PASS_WAIT);
		arch_tick(v);
		cpu_relax();
	}
}

#endif
