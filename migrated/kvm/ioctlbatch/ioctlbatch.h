/*
 * ioctlbatch: a fixed sequence of ioctls run in one call, without the GIL.
 *
 * Why: a vCPU's state is a dozen ioctls each way (x86: regs, sregs, XSAVE, LAPIC, MSRs, ...),
 * inside the downtime. On this project's hosts KVM takes ~5 us per vCPU ioctl; called one by one
 * from Python each took 11-60 us (the call, its buffers, and a GIL release and re-acquire that
 * another thread can take over). One call runs them back to back.
 *
 * Rules (STYLE.md, "cffi bindings"): no allocation, no state, no logging. The caller keeps every
 * argument buffer alive for the call and checks what it passes.
 */
#ifndef IOCTLBATCH_H
#define IOCTLBATCH_H

#include <stdint.h>

/* cffi-cdef-begin */

/* Bump whenever a signature or struct below changes; the wrapper refuses a mismatched build. */
#define IB_ABI_VERSION 1

/* Any non-negative result lets the batch go on. */
#define IB_ANY_RESULT -1

struct ib_call {
    int32_t fd;
    int32_t expect;    /* the result that lets the batch go on, or IB_ANY_RESULT */
    uint64_t request;
    uint64_t arg;      /* passed as is: an address, or a value */
    int64_t result;    /* out: the ioctl's return value, or -errno */
};

/* The IB_ABI_VERSION this object was compiled with. */
int ib_abi_version(void);

/*
 * Run calls[0..n) in order, each call's result stored in its `result`. Stops after the first
 * call that fails (result -errno) or returns other than its `expect`. Returns how many calls
 * ran and were as expected: n when all were, else the index of the call that stopped it.
 * An ioctl interrupted by a signal (EINTR) is run again.
 */
int64_t ib_run(struct ib_call *calls, uint64_t n);

/* cffi-cdef-end */

#endif /* IOCTLBATCH_H */
