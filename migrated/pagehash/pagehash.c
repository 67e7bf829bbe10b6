#include "pagehash.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>

#define P1 0x9E3779B185EBCA87ull
#define P2 0xC2B2AE3D27D4EB4Full
#define P3 0x165667B19E3779F9ull

int ph_abi_version(void) { return PH_ABI_VERSION; }

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v); /* guest RAM is page aligned; memcpy keeps it legal C anyway */
    return v;
}

static inline uint64_t mix(uint64_t h)
{
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

static uint64_t content_hash(const uint8_t *page)
{
    /* Four independent lanes keep the multipliers busy; each word is mixed into its lane. */
    uint64_t a = P1 + 1, b = P2 + 2, c = P3 + 3, d = P1 ^ P2;
    for (size_t off = 0; off < PH_PAGE_SIZE; off += 32) {
        a = rotl(a + load64(page + off) * P2, 31) * P1;
        b = rotl(b + load64(page + off + 8) * P2, 31) * P1;
        c = rotl(c + load64(page + off + 16) * P2, 31) * P1;
        d = rotl(d + load64(page + off + 24) * P2, 31) * P1;
    }
    return rotl(a, 1) + rotl(b, 7) + rotl(c, 12) + rotl(d, 18);
}

/* The page's frame number enters after the content: a zero page anywhere costs one mix. */
static inline uint64_t place(uint64_t content, uint64_t pfn) { return mix(content ^ (pfn * P3)); }

int64_t ph_page_hashes(const uint8_t *base, uint64_t npages, uint64_t first_pfn, uint64_t *out)
{
    if (base == NULL || out == NULL)
        return -EINVAL;
    for (uint64_t i = 0; i < npages; i++)
        out[i] = place(content_hash(base + i * PH_PAGE_SIZE), first_pfn + i);
    return (int64_t)npages;
}

int64_t ph_zero_page_hashes(uint64_t npages, uint64_t first_pfn, uint64_t *out)
{
    static const uint8_t zero[PH_PAGE_SIZE];
    uint64_t content;

    if (out == NULL)
        return -EINVAL;
    content = content_hash(zero);
    for (uint64_t i = 0; i < npages; i++)
        out[i] = place(content, first_pfn + i);
    return (int64_t)npages;
}

/* Whether a page holds a non-zero byte. Its first word decides for nearly every data page (one
 * cache line read); otherwise the whole page is OR-ed in four independent lanes, with no branch
 * (an exit per block was slower where the data starts late in the page: the loads no longer
 * stream), and nothing is copied, where numpy copies the doubtful rows out first. */
static inline int page_is_nonzero(const uint8_t *page)
{
    uint64_t a = 0, b = 0, c = 0, d = 0;

    if (load64(page))
        return 1;
    for (size_t off = 0; off < PH_PAGE_SIZE; off += 32) {
        a |= load64(page + off);
        b |= load64(page + off + 8);
        c |= load64(page + off + 16);
        d |= load64(page + off + 24);
    }
    return (a | b | c | d) != 0;
}

int64_t ph_nonzero_pages(const uint8_t *base, uint64_t npages, uint8_t *out)
{
    int64_t count = 0;

    if (base == NULL || out == NULL)
        return -EINVAL;
    for (uint64_t i = 0; i < npages; i++) {
        out[i] = (uint8_t)page_is_nonzero(base + i * PH_PAGE_SIZE);
        count += out[i];
    }
    return count;
}
