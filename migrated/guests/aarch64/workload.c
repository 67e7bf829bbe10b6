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
 * The loop itself is x86_64/workload_core.h, shared with the x86 guest.
 */
#include <stdint.h>

#include "abi_aarch64.h"
#include "cpu.h"
#include "gic.h"

struct vcpu_arch {
	struct lpi lpi; /* vCPU 0 only; lpi.ready = 0 elsewhere */
};

#include "workload_core.h"

/* start.S checks the parameter page's magic against this before it trusts the page. */
const u64 wla_params_magic = WL_PARAMS_MAGIC;

/* Heartbeat and interrupt work; returns the counter value it read. */
static u64 arch_tick(struct vcpu *v)
{
	u64 now = counter();
	heartbeat(v, now);
	lpi_poll(&v->arch.lpi, now);
	return now;
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
	if (!params_ok(params, index, hz))
		bad_params(&v);
	start_share(&v, counter());
	if (index == 0 && (params[WLA_P_FEATURES] & WLA_F_ITS))
		lpi_setup(&v.arch.lpi, v.status, params, hz);
	run_workload(&v);
}
