/* Per-page 64-bit hashes of guest RAM, for the memory digest compared at cutover.
 *
 * The digest covers all guest RAM while the VM is paused, on both sides, so it must run at
 * memory speed: hashlib's SHA-256 manages ~1.8 GB/s here, this loop several times that. It is an
 * integrity check against our own bugs (a page the tracking missed), not against an attacker:
 * the peer is authenticated before any page flows.
 */
#ifndef MIGRATED_PAGEHASH_H
#define MIGRATED_PAGEHASH_H

#include <stdint.h>

/* cffi-cdef-begin */
#define PH_ABI_VERSION 2
#define PH_PAGE_SIZE 4096
int ph_abi_version(void);
/* Hash npages pages starting at base into out[0..npages). Each hash is seeded with the page's
 * frame number (first_pfn + i), so the same contents at another address hash differently.
 * Returns npages, or -EINVAL for a NULL pointer. */
int64_t ph_page_hashes(const uint8_t *base, uint64_t npages, uint64_t first_pfn, uint64_t *out);
/* The hashes npages all-zero pages would have at first_pfn.. (no guest memory is read: holes in
 * sparse guest RAM hash like zero pages without being touched, which would allocate them). */
int64_t ph_zero_page_hashes(uint64_t npages, uint64_t first_pfn, uint64_t *out);
/* out[i] = 1 if page i of the npages at base holds a non-zero byte, else 0; returns how many
 * do, or -EINVAL for a NULL pointer. A page is read only up to its first non-zero 64-byte
 * block: a data page costs one cache line, a zero page one pass, and nothing is copied (the
 * bulk copy's zero-page split, which the data streams' threads run with the GIL released). */
int64_t ph_nonzero_pages(const uint8_t *base, uint64_t npages, uint8_t *out);
/* cffi-cdef-end */

#endif
