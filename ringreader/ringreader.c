/*
 * ringreader.c: see ringreader.h for the contract of each function.
 *
 * Quotes are from Documentation/virt/kvm/api.rst, section "KVM_CAP_DIRTY_LOG_RING".
 */
#define _POSIX_C_SOURCE 200809L /* clock_nanosleep under -std=c11 */

#include <errno.h>
#include <stddef.h>
#include <time.h>

#include "ringreader.h"

_Static_assert(sizeof(struct rr_dirty_gfn) == 16, "struct kvm_dirty_gfn is 16 bytes");
_Static_assert(offsetof(struct rr_dirty_gfn, offset) == 8, "kvm_dirty_gfn.offset at byte 8");

/* KVM_GET_DIRTY_LOG bitmaps use little-endian bit order; reading them as native u64 words is
 * only right on a little-endian host (x86_64, arm64).  Fail the build rather than the guest. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ringreader assumes a little-endian host"
#endif

int rr_abi_version(void)
{
    return RR_ABI_VERSION;
}

int64_t rr_harvest(struct rr_dirty_gfn *ring, uint32_t n_entries, uint32_t *fetch_index,
                   uint32_t *out_slot, uint64_t *out_offset, uint64_t capacity)
{
    /* "the size of the ring must be a power of two" (in bytes; entries are 16 bytes, so the
     * entry count is one too), which is what makes index & (n - 1) select the entry. */
    if (n_entries == 0 || (n_entries & (n_entries - 1)) != 0)
        return -EINVAL;

    /* One lap at most: past that we would re-read entries we just marked RESET. */
    const uint64_t limit = capacity < n_entries ? capacity : n_entries;
    const uint32_t mask = n_entries - 1;
    uint32_t index = *fetch_index;
    uint64_t count = 0;

    while (count < limit) {
        struct rr_dirty_gfn *gfn = &ring[index & mask];

        /* "userspace accesses to the ring buffer (and more specifically the 'flags' field)
         * must be ordered, using load-acquire/store-release accessors": the acquire pairs
         * with KVM's store-release of DIRTY, so slot/offset read below are the ones KVM
         * published with it. */
        uint32_t flags = __atomic_load_n(&gfn->flags, __ATOMIC_ACQUIRE);

        /* "The userspace should continue to do this until the flags of a GFN have the DIRTY
         * bit cleared" - and "it must collect the dirty GFNs in sequence", so stop here
         * even if later entries are dirty. */
        if (!(flags & RR_DIRTY_GFN_F_DIRTY))
            break;

        out_slot[count] = gfn->slot;
        out_offset[count] = gfn->offset;

        /* "mark the flags from state 01b to 1Xb (bit 0 will be ignored by KVM, but bit 1 must
         * be set ...)".  Release: our reads of slot/offset complete before KVM may see RESET
         * and recycle the entry at KVM_RESET_DIRTY_RINGS. */
        __atomic_store_n(&gfn->flags, (uint32_t)RR_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);

        index++; /* u32 arithmetic: wraps at 2**32 like KVM's own indices */
        count++;
    }

    *fetch_index = index;
    return (int64_t)count;
}

int64_t rr_dedup(const uint32_t *slot, const uint64_t *offset, uint64_t n,
                 uint64_t *const *bitmaps, const uint64_t *slot_npages, uint32_t n_slots,
                 uint32_t *out_slot, uint64_t *out_offset)
{
    /* Validate everything first: a bad entry must not leave half the bits set, or the next
     * call would silently drop those pages as "already seen". */
    for (uint64_t i = 0; i < n; i++) {
        if (slot[i] >= n_slots || offset[i] >= slot_npages[slot[i]])
            return -ERANGE;
    }

    uint64_t kept = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t *word = &bitmaps[slot[i]][offset[i] >> 6];
        const uint64_t bit = UINT64_C(1) << (offset[i] & 63);

        if (*word & bit)
            continue;
        *word |= bit;
        out_slot[kept] = slot[i];
        out_offset[kept] = offset[i];
        kept++;
    }
    return (int64_t)kept;
}

void rr_clear_bits(uint64_t *const *bitmaps, const uint32_t *slot, const uint64_t *offset,
                   uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        bitmaps[slot[i]][offset[i] >> 6] &= ~(UINT64_C(1) << (offset[i] & 63));
}

int64_t rr_bitmap_count(const uint64_t *bitmap, uint64_t n_words)
{
    uint64_t count = 0;

    for (uint64_t w = 0; w < n_words; w++)
        count += (uint64_t)__builtin_popcountll(bitmap[w]);
    return (int64_t)count;
}

int64_t rr_bitmap_to_pages(const uint64_t *bitmap, uint64_t n_words, uint64_t *out_pages,
                           uint64_t capacity)
{
    uint64_t count = 0;

    for (uint64_t w = 0; w < n_words; w++) {
        uint64_t word = bitmap[w];

        /* Zero words (most of a mostly clean guest) cost one load and one branch. */
        while (word != 0) {
            if (count == capacity)
                return -ENOSPC;
            out_pages[count++] = w * 64 + (uint64_t)__builtin_ctzll(word);
            word &= word - 1; /* drop the lowest set bit */
        }
    }
    return (int64_t)count;
}

/* The longest sleep between two looks at the stop flag (rr_wait_dirty). */
#define RR_WAIT_SLICE_NS 10000000u

/* Advances marks[i] over the entries KVM has published since the last look, up to `threshold`
 * past the fetch index, and returns how many it passed.  Entries before the mark were seen
 * DIRTY: KVM publishes in order and only a harvest (which moves the fetch index past them)
 * takes them back.  The acquire pairs with KVM's store-release of DIRTY, as in rr_harvest. */
static uint32_t rr_advance_mark(struct rr_dirty_gfn *const *rings, const uint32_t *fetch_indices,
                                uint32_t *marks, uint32_t i, uint32_t mask, uint32_t threshold)
{
    const uint32_t fetch = __atomic_load_n(&fetch_indices[i], __ATOMIC_RELAXED);
    uint32_t mark = marks[i];
    uint32_t passed = 0;

    if ((int32_t)(mark - fetch) < 0)
        mark = fetch; /* harvested past it meanwhile */
    while (mark - fetch < threshold &&
           (__atomic_load_n(&rings[i][mark & mask].flags, __ATOMIC_ACQUIRE) & RR_DIRTY_GFN_F_DIRTY)) {
        mark++;
        passed++;
    }
    marks[i] = mark;
    return passed;
}

/* Entries of ring i seen waiting: from its fetch index to its mark (0 if a harvest by another
 * thread has just passed the mark). */
static uint32_t rr_fill(const uint32_t *fetch_indices, const uint32_t *marks, uint32_t i)
{
    const int32_t fill = (int32_t)(marks[i] - __atomic_load_n(&fetch_indices[i], __ATOMIC_RELAXED));

    return fill > 0 ? (uint32_t)fill : 0;
}

uint64_t rr_check_gap_ns(uint32_t fill, uint32_t passed, uint32_t threshold, uint64_t slept_ns,
                         uint64_t interval_ns, uint64_t max_interval_ns)
{
    if (passed == 0)
        return max_interval_ns;
    const uint64_t left = fill < threshold ? threshold - fill : 0;
    /* 128 bits: left < 2^32 times a gap of up to a day (< 2^47 ns) would not fit 64. */
    const uint64_t eta = (uint64_t)((unsigned __int128)left * slept_ns / passed / 2);

    return eta < interval_ns ? interval_ns : eta > max_interval_ns ? max_interval_ns : eta;
}

int64_t rr_wait_dirty(struct rr_dirty_gfn *const *rings, const uint32_t *fetch_indices,
                      uint32_t *marks, uint32_t *passed, uint32_t n_rings, uint32_t n_entries,
                      uint32_t threshold, const int32_t *stop, uint64_t interval_ns,
                      uint64_t max_interval_ns, uint64_t idle_ns, int32_t *due)
{
    if (n_entries == 0 || (n_entries & (n_entries - 1)) != 0 || threshold == 0 ||
        threshold > n_entries || interval_ns == 0 || max_interval_ns < interval_ns || idle_ns == 0)
        return -EINVAL;

    const uint32_t mask = n_entries - 1;
    uint64_t checks = 0, slept = 0, next = interval_ns;

    *due = 0;
    for (uint32_t i = 0; i < n_rings; i++) {
        marks[i] = __atomic_load_n(&fetch_indices[i], __ATOMIC_RELAXED);
        rr_advance_mark(rings, fetch_indices, marks, i, mask, threshold);
    }
    while (slept < idle_ns) {
        /* Relative sleeps: a late wake-up (a busy host) delays the next check, never bunches
         * checks up to catch up.  In slices, so that a stop is seen within one slice even when
         * the interval is long. */
        for (uint64_t left = next; left > 0;) {
            const uint64_t slice = left < RR_WAIT_SLICE_NS ? left : RR_WAIT_SLICE_NS;
            struct timespec pause = {.tv_sec = 0, .tv_nsec = (long)slice};

            /* A signal (a process-directed one may land on this thread) resumes the sleep with
             * what was left of it, not the whole slice again. */
            while (clock_nanosleep(CLOCK_MONOTONIC, 0, &pause, &pause) == EINTR)
                ;
            if (__atomic_load_n(stop, __ATOMIC_ACQUIRE))
                return (int64_t)checks;
            left -= slice;
        }
        slept += next;
        checks++;
        for (uint32_t i = 0; i < n_rings; i++) {
            passed[i] = rr_advance_mark(rings, fetch_indices, marks, i, mask, threshold);
            if (rr_fill(fetch_indices, marks, i) >= threshold) {
                *due = 1;
                return (int64_t)checks;
            }
        }
        const uint64_t slept_now = next;

        next = max_interval_ns;
        for (uint32_t i = 0; i < n_rings; i++) {
            const uint64_t gap = rr_check_gap_ns(rr_fill(fetch_indices, marks, i), passed[i],
                                                 threshold, slept_now, interval_ns, max_interval_ns);
            if (gap < next)
                next = gap;
        }
    }
    for (uint32_t i = 0; i < n_rings; i++) {
        if (rr_fill(fetch_indices, marks, i) > 0) {
            *due = 1;
            break;
        }
    }
    return (int64_t)checks;
}
