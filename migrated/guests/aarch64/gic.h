/* GICv3 and ITS register offsets and fields the guest uses (Arm IHI 0069, GICv3/v4 architecture
 * specification), and the guest's interface to them (its.c). */
#ifndef WLA_GIC_H
#define WLA_GIC_H

#include "cpu.h"

#define BIT(n) (1ULL << (n))

/* Distributor (GICD_). KVM implements one security state (GICD_CTLR.DS = 1). */
#define GICD_CTLR 0x0000
#define GICD_CTLR_ENABLE_G0 BIT(0)
#define GICD_CTLR_ENABLE_G1 BIT(1)
#define GICD_CTLR_ARE BIT(4)
#define GICD_CTLR_RWP BIT(31)

/* Redistributor (GICR_), RD_base frame; SGI_base follows at +64 KiB. */
#define GICR_CTLR 0x0000
#define GICR_CTLR_ENABLE_LPIS BIT(0)
#define GICR_CTLR_RWP BIT(3)
#define GICR_TYPER 0x0008
#define GICR_TYPER_PLPIS BIT(0)
#define GICR_TYPER_VLPIS BIT(1)
#define GICR_TYPER_LAST BIT(4)
#define GICR_WAKER 0x0014
#define GICR_WAKER_PROCESSOR_SLEEP BIT(1)
#define GICR_WAKER_CHILDREN_ASLEEP BIT(2)
#define GICR_PROPBASER 0x0070
#define GICR_PENDBASER 0x0078
#define GICR_PENDBASER_PTZ BIT(62)
#define GICR_FRAMES_STRIDE 0x20000   /* RD_base + SGI_base */
#define GICR_FRAMES_STRIDE_V4 0x40000 /* + VLPI_base + reserved, when GICR_TYPER.VLPIS */

/* Fields shared by PROPBASER, PENDBASER, CBASER: inner cacheability [9:7] for the redistributor
 * registers, shareability [11:10] everywhere. */
#define GICR_BASER_INNER_WB (7ULL << 7)      /* Normal inner read/write-allocate write-back */
#define GIC_BASER_SH_INNER (1ULL << 10)
#define GIC_BASER_SH_MASK (3ULL << 10)
#define GICR_PROPBASER_ADDR(v) ((v) & 0x000ffffffffff000ULL) /* [51:12] */
#define GICR_PENDBASER_ADDR(v) ((v) & 0x000fffffffff0000ULL) /* [51:16] */

/* ITS control frame (GITS_). */
#define GITS_CTLR 0x0000
#define GITS_CTLR_ENABLED BIT(0)
#define GITS_TYPER 0x0008
#define GITS_TYPER_PHYSICAL BIT(0)
#define GITS_TYPER_ITT_ENTRY_SIZE(v) ((((v) >> 4) & 0xf) + 1)
#define GITS_TYPER_ID_BITS(v) ((((v) >> 8) & 0x1f) + 1)
#define GITS_TYPER_DEV_BITS(v) ((((v) >> 13) & 0x1f) + 1)
#define GITS_TYPER_PTA BIT(19)
#define GITS_CBASER 0x0080
#define GITS_CWRITER 0x0088
#define GITS_CREADR 0x0090
#define GITS_CREADR_STALLED BIT(0)
#define GITS_BASER(n) (0x0100 + 8 * (n))

#define GITS_BASER_VALID BIT(63)
#define GITS_BASER_INDIRECT BIT(62)
#define GITS_BASER_INNER_WB (7ULL << 59)
#define GITS_BASER_TYPE(v) (((v) >> 56) & 7)
#define GITS_BASER_TYPE_DEVICE 1
#define GITS_BASER_TYPE_COLLECTION 4
#define GITS_BASER_ENTRY_SIZE(v) ((((v) >> 48) & 0x1f) + 1)
#define GITS_BASER_ADDR_64K(v) ((v) & 0x0000ffffffff0000ULL) /* [47:16]; [15:12] = PA[51:48] */
#define GITS_BASER_PAGE_SIZE_MASK (3ULL << 8)
#define GITS_BASER_PAGE_SIZE_64K (2ULL << 8) /* KVM's only page size */
#define GITS_BASER_SIZE_MASK 0xffULL
#define GITS_CBASER_ADDR(v) ((v) & 0x000ffffffffff000ULL) /* [51:12] */
#define GITS_CBASER_SIZE_MASK 0xffULL

#define ITS_TABLE_BYTES 0x10000 /* one 64 KiB page per table */
#define ITS_CMDQ_BYTES 0x1000   /* CBASER.Size = 0: one 4 KiB page, 128 commands */
#define ITS_CMD_BYTES 32
#define ITS_ITT_BYTES 0x1000

/* ITS commands (first byte of the 32-byte command). */
#define ITS_CMD_MOVI 0x01
#define ITS_CMD_INT 0x03
#define ITS_CMD_CLEAR 0x04
#define ITS_CMD_SYNC 0x05
#define ITS_CMD_MAPD 0x08
#define ITS_CMD_MAPC 0x09
#define ITS_CMD_MAPTI 0x0a
#define ITS_CMD_VALID BIT(63)

/* LPI configuration table entry: priority [7:2], bit 1 RES1 (group 1 for LPIs), enable bit 0. */
#define LPI_PROP_RES1 BIT(1)
#define LPI_PROP_ENABLED BIT(0)

#define INTID_SPURIOUS_FIRST 1020 /* 1020-1023: special, nothing to acknowledge */

/* The guest's side of its.c. */
struct lpi {
	u64 *status;       /* the vCPU's status page */
	const u64 *params;
	u64 counter_hz;
	u64 its;           /* ITS control frame */
	u64 cmdq;
	u64 cwriter;       /* byte offset of the next free command slot */
	u64 device;
	u64 rdbase;        /* target field of MAPC and SYNC */
	u64 rate;          /* INT commands per second, as last read */
	u64 period;        /* counter ticks between INT commands; 0: none */
	u64 last_int;
	u64 next_event;
	u64 outstanding;   /* bitmask of INT events sent and not yet acknowledged */
	int ready;
};

/* vCPU 0: distributor, own redistributor (LPIs), CPU interface, ITS tables and queue, then
 * MAPD/MAPC/MAPTI/SYNC. Reports progress and any failure in the status page; returns ready. */
int lpi_setup(struct lpi *l, u64 *status, const u64 *params, u64 counter_hz);

/* Acknowledges whatever LPIs are pending, and issues the next INT when one is due. Cheap when
 * there is nothing to do; call it often (between pages, while throttled). */
void lpi_poll(struct lpi *l, u64 now);

#endif
