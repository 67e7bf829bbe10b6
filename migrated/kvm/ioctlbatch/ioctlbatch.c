#include "ioctlbatch.h"

#include <errno.h>
#include <sys/ioctl.h>

int ib_abi_version(void) { return IB_ABI_VERSION; }

int64_t ib_run(struct ib_call *calls, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        struct ib_call *call = &calls[i];
        int result;
        do {
            result = ioctl(call->fd, (unsigned long)call->request, (unsigned long)call->arg);
        } while (result < 0 && errno == EINTR);
        call->result = result < 0 ? -(int64_t)errno : (int64_t)result;
        if (result < 0 || (call->expect != IB_ANY_RESULT && result != call->expect))
            return (int64_t)i;
    }
    return (int64_t)n;
}
