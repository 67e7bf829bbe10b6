/* The contract between the workload guest and the VMM: page formats and word indices.
 *
 * Mirrored by migrated/guests/abi.py; tests/guests/test_workload_build.py parses this file and
 * fails if the two disagree, so change both together (and bump WL_VERSION when the layout moves).
 * Everything is little-endian u64 words unless noted.
 */
#ifndef WL_ABI_H
#define WL_ABI_H

#define WL_VERSION 1ULL
#define WL_PAGE_SIZE 4096ULL
#define WL_PAGE_WORDS 512ULL

/* Parameter page (written by the VMM; the guest only reads it). */
#define WL_PARAMS_MAGIC 0x4d5241504c57474dULL /* "MGWLPARM" */
#define WL_P_MAGIC 0
#define WL_P_VERSION 1
#define WL_P_NVCPUS 2
#define WL_P_WS_BASE 3      /* GPA of working-set page 0 */
#define WL_P_WS_PAGES 4
#define WL_P_TSC_HZ 5       /* guest TSC ticks per second */
#define WL_P_STATUS_BASE 6  /* status page of vCPU i at STATUS_BASE + i * 4096 */
#define WL_P_GEN_BASE 7     /* u32 generation per working-set page, indexed by global page index */
#define WL_P_SEED 8
#define WL_P_MODE 9         /* re-read live */
#define WL_P_RATE 10        /* pages/s per vCPU, re-read live; 0 idle, ~0 unlimited */
#define WL_P_PASS_REQ 11    /* passes mode: passes requested so far, re-read live */
/* vCPU i's own rate (i < WL_VCPU_RATES) in word WL_P_VCPU_RATE + i, pages/s, re-read live; 0: the
 * VM-wide WL_P_RATE applies. Lets one vCPU dirty fast and another slowly (per-vCPU dirty limit).
 * Words 16-31: the shared words end below 32, where the architectures' own begin. */
#define WL_P_VCPU_RATE 16
#define WL_VCPU_RATES 16

#define WL_MODE_CONTINUOUS 0ULL
#define WL_MODE_PASSES 1ULL
#define WL_RATE_UNLIMITED 0xffffffffffffffffULL

/* Status page, one per vCPU (written by the guest only). */
#define WL_STATUS_MAGIC 0x544154534c57474dULL /* "MGWLSTAT" */
#define WL_S_MAGIC 0
#define WL_S_VCPU 1
#define WL_S_STATE 2
#define WL_S_HEARTBEAT 3        /* +1 at least every ~1 ms of guest TSC time, whatever the state */
#define WL_S_PAGES_WRITTEN 4
#define WL_S_PASSES_DONE 5
#define WL_S_VERIFY_ERRORS 6
#define WL_S_LAST_ERROR_GPA 7   /* 0: none (GPA 0 is never in the working set) */
#define WL_S_LAST_ERROR_GEN 8   /* generation the guest expected there */
#define WL_S_SWEEP 9            /* sweeps (or passes) started, so the current one's number */
#define WL_S_BUSY_PAGE 10       /* global index + 1 of the page being verified/written; 0: none */
#define WL_S_FIRST_PAGE 11
#define WL_S_PAGE_COUNT 12
#define WL_S_RATE_SEEN 13

#define WL_STATE_BOOTING 0ULL
#define WL_STATE_WRITING 1ULL
#define WL_STATE_THROTTLED 2ULL
#define WL_STATE_IDLE 3ULL
#define WL_STATE_PASS_WAIT 4ULL
#define WL_STATE_BAD_PARAMS 5ULL

/* Working-set page: an 8-word header, then a 504-word body. */
#define WL_PAGE_MAGIC 0x454741504c57474dULL /* "MGWLPAGE" */
#define WL_H_MAGIC 0
#define WL_H_GPA 1
#define WL_H_GEN 2        /* generation (low 32 bits) | writer vCPU << 32 */
#define WL_H_INDEX 3      /* global working-set page index */
#define WL_H_CHECKSUM 4   /* wl_checksum() of the body */
#define WL_HEADER_WORDS 8 /* words 5..7 are zero */

/* Body word i (WL_HEADER_WORDS <= i < 512): x = base + i * WL_STEP; word = x ^ (x >> 29),
 * base = wl_mix64(gpa ^ seed ^ gen * WL_GOLDEN). Checksum: sum of word_i * (2i + 1) mod 2^64;
 * odd weights make every single-bit flip and most word swaps change it. */
#define WL_GOLDEN 0x9e3779b97f4a7c15ULL
#define WL_STEP 0xd1b54a32d192ed03ULL
#define WL_MIX_M1 0xbf58476d1ce4e5b9ULL
#define WL_MIX_M2 0x94d049bb133111ebULL

#endif
