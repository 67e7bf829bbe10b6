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

static uint64_t hash_page(const uint8_t *page, uint64_t pfn)
{
    /* Four independent lanes keep the multipliers busy; each word is mixed with its lane. */
    uint64_t a = pfn * P1 + 1, b = pfn * P2 + 2, c = pfn * P3 + 3, d = pfn + P1;
    for (size_t off = 0; off < PH_PAGE_SIZE; off += 32) {
        a = rotl(a + load64(page + off) * P2, 31) * P1;
        b = rotl(b + load64(page + off + 8) * P2, 31) * P1;
        c = rotl(c + load64(page + off + 16) * P2, 31) * P1;
        d = rotl(d + load64(page + off + 24) * P2, 31) * P1;
    }
    return mix(rotl(a, 1) + rotl(b, 7) + rotl(c, 12) + rotl(d, 18) + pfn);
}

int64_t ph_page_hashes(const uint8_t *base, uint64_t npages, uint64_t first_pfn, uint64_t *out)
{
    if (base == NULL || out == NULL)
        return -EINVAL;
    for (uint64_t i = 0; i < npages; i++)
        out[i] = hash_page(base + i * PH_PAGE_SIZE, first_pfn + i);
    return (int64_t)npages;
}

int64_t ph_zero_page_hashes(uint64_t npages, uint64_t first_pfn, uint64_t *out)
{
    static const uint8_t zero[PH_PAGE_SIZE];

    if (out == NULL)
        return -EINVAL;
    for (uint64_t i = 0; i < npages; i++)
        out[i] = hash_page(zero, first_pfn + i);
    return (int64_t)npages;
}
