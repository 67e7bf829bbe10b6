/* The page format's arithmetic, shared by the guest and by host-side tests (which compile it
 * natively and compare it with the numpy reference in migrated/guests/pages.py). */
#ifndef WL_PAGE_H
#define WL_PAGE_H

#include <stdint.h>
#include "abi.h"

static inline uint64_t wl_mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * WL_MIX_M1;
	z = (z ^ (z >> 27)) * WL_MIX_M2;
	return z ^ (z >> 31);
}

static inline uint64_t wl_page_base(uint64_t gpa, uint32_t gen, uint64_t seed)
{
	return wl_mix64(gpa ^ seed ^ ((uint64_t)gen * WL_GOLDEN));
}

/* Fills the body and then the header, so a page is self-consistent once its header is stored. */
static inline void wl_fill_page(uint64_t *page, uint64_t gpa, uint64_t index, uint32_t gen,
				uint32_t vcpu, uint64_t seed)
{
	uint64_t x = wl_page_base(gpa, gen, seed) + WL_HEADER_WORDS * WL_STEP;
	uint64_t sum = 0;
	for (uint64_t i = WL_HEADER_WORDS; i < WL_PAGE_WORDS; i++) {
		uint64_t w = x ^ (x >> 29);
		page[i] = w;
		sum += w * (2 * i + 1);
		x += WL_STEP;
	}
	page[5] = 0;
	page[6] = 0;
	page[7] = 0;
	page[WL_H_GPA] = gpa;
	page[WL_H_GEN] = (uint64_t)gen | ((uint64_t)vcpu << 32);
	page[WL_H_INDEX] = index;
	page[WL_H_CHECKSUM] = sum;
	page[WL_H_MAGIC] = WL_PAGE_MAGIC;
}

static inline uint64_t wl_checksum(const uint64_t *page)
{
	uint64_t sum = 0;
	for (uint64_t i = WL_HEADER_WORDS; i < WL_PAGE_WORDS; i++)
		sum += page[i] * (2 * i + 1);
	return sum;
}

/* Whether a page holds what its writer left there at generation `gen` (0: never written, so it
 * must be all zero, as the VMM hands over zeroed RAM). Reads only the page itself. */
static inline int wl_page_valid(const uint64_t *page, uint64_t gpa, uint64_t index, uint32_t gen,
				uint32_t vcpu)
{
	if (gen == 0) {
		uint64_t any = 0;
		for (uint64_t i = 0; i < WL_PAGE_WORDS; i++)
			any |= page[i];
		return any == 0;
	}
	return page[WL_H_MAGIC] == WL_PAGE_MAGIC && page[WL_H_GPA] == gpa &&
	       page[WL_H_GEN] == ((uint64_t)gen | ((uint64_t)vcpu << 32)) &&
	       page[WL_H_INDEX] == index && (page[5] | page[6] | page[7]) == 0 &&
	       page[WL_H_CHECKSUM] == wl_checksum(page);
}

#endif
