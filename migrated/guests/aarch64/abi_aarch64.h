/* The arm64 workload guest's additions to the guest/VMM contract.
 *
 * Shared-copy policy: the architecture-neutral contract (parameter page words 0-31, status page
 * words 0-31, the working-set page format) has ONE copy, migrated/guests/x86_64/abi.h and page.h;
 * this guest compiles them in unchanged (the build puts ../x86_64 on the include path), so both
 * guests always agree with each other and with migrated/guests/abi.py. Only what is arm64's own
 * lives here, in words 32 and up, named WLA_*; migrated/guests/aarch64_boot.py mirrors every
 * WLA_* below and tests/guests/test_aarch64_build.py fails if the two disagree. A word moving
 * here bumps WLA_VERSION.
 *
 * No integer suffixes: start.S includes this file too (C gives large hex constants an unsigned
 * 64-bit type by itself).
 */
#ifndef WLA_ABI_H
#define WLA_ABI_H

#define WLA_VERSION 1
#define WLA_FIRST_WORD 32 /* words below are abi.h's; the x86 guest leaves 32..511 unused */

/* Parameter page, arm64 words (written by the VMM; the guest only reads them).
 * WL_P_TSC_HZ is the generic counter's frequency here; 0 means "read CNTFRQ_EL0". */
#define WLA_P_VERSION 32
#define WLA_P_FEATURES 33
#define WLA_P_STACK_BASE 34     /* vCPU i's stack: [STACK_BASE + i * STACK_SIZE, + STACK_SIZE) */
#define WLA_P_STACK_SIZE 35
#define WLA_P_GICD_BASE 36      /* GICv3 distributor */
#define WLA_P_GICR_BASE 37      /* first redistributor; the guest finds its own by MPIDR */
#define WLA_P_ITS_BASE 38       /* ITS control frame */
#define WLA_P_ITS_DEVICE_TABLE 39   /* GITS_BASER device table: 64 KiB, 64 KiB aligned */
#define WLA_P_ITS_COLL_TABLE 40     /* GITS_BASER collection table: 64 KiB, 64 KiB aligned */
#define WLA_P_ITS_CMDQ 41       /* command queue: 4 KiB used, 64 KiB aligned (KVM's CBASER) */
#define WLA_P_ITS_ITT 42        /* the device's interrupt translation table: 4 KiB */
#define WLA_P_LPI_PROP 43       /* LPI configuration table (GICR_PROPBASER): 8 KiB */
#define WLA_P_LPI_PEND 44       /* vCPU 0's LPI pending table (GICR_PENDBASER): 64 KiB aligned */
#define WLA_P_ITS_DEVICE_ID 45
#define WLA_P_LPI_RATE 46       /* INT commands per second issued by vCPU 0, re-read live; 0: none */
#define WLA_P_LPI_HOLD 47       /* non-zero: vCPU 0 leaves LPIs pending (not acknowledged), live */

#define WLA_F_ITS 1             /* vCPU 0 programs the redistributor, the CPU interface, the ITS */

/* Status page, arm64 words (written by the guest only). */
#define WLA_S_VERSION 32
#define WLA_S_COUNTER_HZ 33     /* the counter frequency the guest uses */
#define WLA_S_MPIDR 34
#define WLA_S_ITS_STATE 35
#define WLA_S_ITS_ERROR 36      /* WLA_ERR_*: the step that failed */
#define WLA_S_ITS_DETAIL 37     /* the register value that step did not like */
#define WLA_S_REDIST 38         /* GPA of this vCPU's redistributor (RD_base) */
#define WLA_S_ITS_COMMANDS 39   /* commands the ITS consumed (CREADR caught up) */
#define WLA_S_LPIS_EXPECTED 40  /* INT commands consumed: each makes one LPI pending */
#define WLA_S_LPIS_RECEIVED 41  /* of those, acknowledged (ICC_IAR1_EL1) */
#define WLA_S_LPIS_UNEXPECTED 42    /* acknowledged INTIDs nobody asked for */
#define WLA_S_MSIS_RECEIVED 43  /* LPIs of the VMM's events (KVM_SIGNAL_MSI), acknowledged */
#define WLA_S_LPI_OUTSTANDING 44    /* bitmask of INT events sent and not yet received */
#define WLA_S_LPI_STALLS 45     /* INTs skipped because every event was still outstanding */
#define WLA_S_LAST_INTID 46
#define WLA_S_LPI_RATE_SEEN 47
#define WLA_S_FAULT_ESR 48      /* filled by the exception vectors, then PSCI SYSTEM_OFF */
#define WLA_S_FAULT_ELR 49
#define WLA_S_FAULT_FAR 50
#define WLA_S_FAULT_VECTOR 51   /* vector slot 0-15 (VBAR_EL1 + 0x80 * slot) */
#define WLA_S_ITS_CREADR 52     /* last GITS_CREADR seen (its offset; bit 0: stalled) */

#define WLA_STATE_FAULT 16      /* in WL_S_STATE: an exception was taken (see WLA_S_FAULT_*) */

#define WLA_ITS_OFF 0
#define WLA_ITS_PROGRAMMING 1
#define WLA_ITS_READY 2
#define WLA_ITS_FAILED 3

#define WLA_ERR_NONE 0
#define WLA_ERR_NO_REDIST 1     /* no redistributor's GICR_TYPER.Affinity matches MPIDR_EL1 */
#define WLA_ERR_NO_PLPIS 2      /* GICR_TYPER.PLPIS = 0 */
#define WLA_ERR_LPIS_ENABLED 3  /* GICR_CTLR.EnableLPIs was already set */
#define WLA_ERR_PROPBASER 4
#define WLA_ERR_PENDBASER 5
#define WLA_ERR_ITS_TYPER 6     /* not physical LPIs, too few device or event id bits, ITT entry */
#define WLA_ERR_ITS_ENABLED 7   /* GITS_CTLR.Enabled was already set */
#define WLA_ERR_BASER 8         /* a table register did not take our value */
#define WLA_ERR_NO_TABLE 9      /* no GITS_BASER<n> of type Devices or Collections */
#define WLA_ERR_CBASER 10
#define WLA_ERR_ITS_ENABLE 11   /* GITS_CTLR.Enabled did not stick */
#define WLA_ERR_CMD_TIMEOUT 12  /* GITS_CREADR did not reach GITS_CWRITER within ~1 s */
#define WLA_ERR_RWP 13          /* GICD_CTLR.RWP or GICR_CTLR.RWP stayed set */
#define WLA_ERR_WAKER 14        /* GICR_WAKER.ChildrenAsleep stayed set */

/* The device's events: 0..INT_EVENTS-1 are raised by the guest's own INT commands, the rest by
 * the VMM (KVM_SIGNAL_MSI, as an emulated device would). Event e is LPI LPI_BASE + e, routed
 * through collection 0 to vCPU 0. */
#define WLA_EVENT_BITS 5
#define WLA_EVENTS 32
#define WLA_INT_EVENTS 16
#define WLA_LPI_BASE 8192
#define WLA_LPI_ID_BITS 14      /* GICR_PROPBASER.IDbits + 1: INTIDs below 16384 */
#define WLA_LPI_PRIORITY 0xa0
#define WLA_ICID 0

#endif
