/* The x86_64 workload guest: each vCPU verifies and rewrites its share of the working set at a
 * rate the VMM sets, and reports through its status page. Runs at CPL3 (native speed on PVM),
 * with no IDT and no interrupts unless the small OS runs under it (kernel.c, smallos.c): then a
 * fault is recorded by the kernel; otherwise it ends in a triple fault that the VMM reports.
 * The loop itself is workload_core.h, shared with the arm64 guest.
 */
#include <stdint.h>

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;

struct wlx;
static void wlx_check(struct wlx *x);

struct vcpu_arch {
	struct wlx *wlx; /* the small OS's CPL3 checks (abi_smallos.h); NULL when off */
};

#include "workload_core.h"

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

static u64 arch_tick(struct vcpu *v)
{
	u64 now = rdtsc();
	if (heartbeat(v, now) && v->arch.wlx)
		wlx_check(v->arch.wlx);
	return now;
}

#include "smallos.c"
#include "kernel.c"

static int params_ok(const u64 *p, u64 index)
{
	return p[WL_P_MAGIC] == WL_PARAMS_MAGIC && p[WL_P_VERSION] == WL_VERSION &&
	       index < p[WL_P_NVCPUS] && p[WL_P_WS_PAGES] >= p[WL_P_NVCPUS] &&
	       p[WL_P_TSC_HZ] >= 1000 && p[WL_P_WS_BASE] % WL_PAGE_SIZE == 0 &&
	       p[WL_P_STATUS_BASE] % WL_PAGE_SIZE == 0 && p[WL_P_GEN_BASE] % 4 == 0;
}

__attribute__((noreturn, used)) void workload_main(u64 index, const u64 *params)
{
	if (params[WL_P_MAGIC] != WL_PARAMS_MAGIC) /* nowhere to report: spin, no heartbeat */
		for (;;)
			cpu_relax();

	struct vcpu v = {
		.params = params,
		.status = (u64 *)(params[WL_P_STATUS_BASE] + index * WL_PAGE_SIZE),
		.gen = (u32 *)params[WL_P_GEN_BASE],
		.index = index,
		.ws_base = params[WL_P_WS_BASE],
		.seed = params[WL_P_SEED],
		.hz = params[WL_P_TSC_HZ],
	};
	report(&v, WL_S_VCPU, index);
	report(&v, WL_S_MAGIC, WL_STATUS_MAGIC);
	if (!params_ok(params, index))
		bad_params(&v);
	start_share(&v, rdtsc());
	struct wlx wlx;
	if (params[WLX_P_FLAGS] & WLX_F_SMALLOS) {
		wlx_begin(&wlx, index, params);
		v.arch.wlx = &wlx;
	}
	run_workload(&v);
}
