/*
 * ringreader: the KVM dirty-ring harvest loop, and the dedup/bitmap helpers that keep its cost
 * proportional to the number of dirty pages instead of the guest's size.
 *
 * Rules for this file and ringreader.c (see STYLE.md, "cffi bindings"): no allocation, no state,
 * no logging.  Functions return a count or a negative errno.  They check only what they need
 * for memory safety of the loop itself; the Python wrapper (ringreader/_args.py) checks pointers,
 * lengths and dtypes before they get here.
 *
 * The block between the "cffi-cdef" markers is fed verbatim to cffi's cdef() by _build.py, so it
 * must stay within what cffi's parser accepts: plain declarations and integer #defines.
 */
#ifndef RINGREADER_H
#define RINGREADER_H

#include <stdint.h>

/* cffi-cdef-begin */

/* Bump whenever a signature or struct below changes; the wrapper refuses a mismatched build. */
#define RR_ABI_VERSION 3

/* Mirror of KVM_DIRTY_GFN_F_DIRTY / KVM_DIRTY_GFN_F_RESET from <linux/kvm.h>. */
#define RR_DIRTY_GFN_F_DIRTY 1
#define RR_DIRTY_GFN_F_RESET 2
#define RR_DIRTY_GFN_F_MASK 3

/* Layout of struct kvm_dirty_gfn: one 16-byte entry of a vCPU's mmapped dirty ring. */
struct rr_dirty_gfn {
    uint32_t flags;
    uint32_t slot;   /* (address space id << 16) | memslot id */
    uint64_t offset; /* page offset inside that memslot */
};

/* The RR_ABI_VERSION this object was compiled with. */
int rr_abi_version(void);

/*
 * Harvest dirty entries in order starting at *fetch_index, at most min(capacity, n_entries).
 * Each harvested entry's (slot, offset) goes to out_slot/out_offset and its flags become
 * RR_DIRTY_GFN_F_RESET.  *fetch_index is advanced (u32, wraps) past the harvested entries.
 * Returns the count, or -EINVAL if n_entries is 0 or not a power of two.
 */
int64_t rr_harvest(struct rr_dirty_gfn *ring, uint32_t n_entries, uint32_t *fetch_index,
                   uint32_t *out_slot, uint64_t *out_offset, uint64_t capacity);

/*
 * Keep the first occurrence of every (slot, offset) among n entries, in input order, using
 * bitmaps[slot] (one bit per page of slot_npages[slot] pages) as the "seen" set.  The bits of
 * kept entries are left SET: pass the output to rr_clear_bits() to return the bitmaps to zero.
 * Returns the number kept, or -ERANGE (bitmaps untouched) if any slot >= n_slots or any
 * offset >= slot_npages[slot].  out_slot/out_offset must hold n entries.
 */
int64_t rr_dedup(const uint32_t *slot, const uint64_t *offset, uint64_t n,
                 uint64_t *const *bitmaps, const uint64_t *slot_npages, uint32_t n_slots,
                 uint32_t *out_slot, uint64_t *out_offset);

/* Clear exactly the n given bits.  No range checks: pass only what rr_dedup() returned. */
void rr_clear_bits(uint64_t *const *bitmaps, const uint32_t *slot, const uint64_t *offset,
                   uint64_t n);

/* Number of set bits in a bitmap of n_words u64 words. */
int64_t rr_bitmap_count(const uint64_t *bitmap, uint64_t n_words);

/*
 * Indices of the set bits of a KVM_GET_DIRTY_LOG bitmap (u64 words, bit i of word w is page
 * w * 64 + i), ascending.  Returns the count, or -ENOSPC if more than capacity bits are set.
 */
int64_t rr_bitmap_to_pages(const uint64_t *bitmap, uint64_t n_words, uint64_t *out_pages,
                           uint64_t capacity);

/*
 * The gap before the next check of a ring that holds `fill` entries waiting, `passed` of them
 * published during the last `slept_ns`: half the time it needs to reach `threshold` at that
 * pace, within [interval_ns, max_interval_ns]; max_interval_ns if nothing was published.
 * (rr_wait_dirty takes the smallest over its rings.)
 */
uint64_t rr_check_gap_ns(uint32_t fill, uint32_t passed, uint32_t threshold, uint64_t slept_ns,
                         uint64_t interval_ns, uint64_t max_interval_ns);

/*
 * The continuous harvester's wait, so that a check of the rings costs no Python and no GIL
 * (for every VM the daemon hosts).  rings[i] is a ring of n_entries entries and fetch_indices[i]
 * its next entry to harvest (read afresh at every check: another thread may harvest meanwhile,
 * and a stale index only delays or adds a harvest).  marks and passed are the caller's scratch,
 * n_rings entries each (no state is kept between calls).
 *
 * A check finds how many entries each ring holds waiting (KVM publishes them in order, so it
 * reads only the entries published since the last check, and at most `threshold`).  The next
 * check comes after half the time the fastest-filling ring needs to reach `threshold` at the
 * pace of the last interval, but no sooner than interval_ns and no later than max_interval_ns:
 * a quiet ring is looked at every max_interval_ns, a filling one more often as it fills.
 *
 * Returns when a ring holds `threshold` or more entries waiting, or once the intervals slept
 * add up to idle_ns (then *due says whether any ring holds an entry), or when *stop is non-zero
 * (looked at every 10 ms at most).  *due is set to 1 in the first case, 0 in the last.  Returns
 * the number of checks made, or -EINVAL if n_entries is 0 or not a power of two, threshold is 0
 * or above n_entries, interval_ns or idle_ns is 0, or max_interval_ns is below interval_ns.
 */
int64_t rr_wait_dirty(struct rr_dirty_gfn *const *rings, const uint32_t *fetch_indices,
                      uint32_t *marks, uint32_t *passed, uint32_t n_rings, uint32_t n_entries,
                      uint32_t threshold, const int32_t *stop, uint64_t interval_ns,
                      uint64_t max_interval_ns, uint64_t idle_ns, int32_t *due);

/* cffi-cdef-end */

#endif /* RINGREADER_H */
