/* vCPU 0's interrupt work: LPIs through the GICv3 ITS, programmed the way an OS driver does.
 *
 * Set-up (lpi_setup): the distributor's group 1 on (KVM forwards nothing while it is off), this
 * vCPU's redistributor found by MPIDR and woken, the LPI configuration table filled and
 * GICR_PROPBASER / GICR_PENDBASER / GICR_CTLR.EnableLPIs set, the CPU interface enabled
 * (ICC_SRE_EL1.SRE, ICC_PMR_EL1 = 0xff, ICC_IGRPEN1_EL1 = 1), then the ITS: device and collection
 * tables (GITS_BASER<n>) and the command queue (GITS_CBASER) in guest RAM, GITS_CTLR.Enabled,
 * and MAPD (device -> ITT), MAPC (collection 0 -> this redistributor), one MAPTI per event
 * (event e -> LPI 8192 + e), SYNC.
 *
 * From then on the guest writes only the command queue and GITS_CWRITER. The device table, the
 * collection table, the ITT and the pending table belong to KVM, which writes them on
 * KVM_DEV_ARM_ITS_SAVE_TABLES / KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES while no vCPU runs.
 *
 * Running (lpi_poll): every period an INT command makes one of the INT events' LPIs pending; the
 * LPIs are taken by polling ICC_IAR1_EL1 with interrupts masked in PSTATE (no vector table, no
 * handler), then ICC_EOIR1_EL1 (EOImode 0: priority drop and deactivation). An event is sent again
 * only once its LPI arrived, as a second INT would merge with the pending one: so
 * lpis_received == lpis_expected whenever nothing is outstanding, and any loss shows.
 *
 * While the VMM sets the hold parameter, nothing is acknowledged: the LPIs stay pending (and
 * KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES writes them into the pending table).
 *
 * Guest writes to GITS_TRANSLATER do not reach KVM's ITS (KVM ignores them): device MSIs are the
 * VMM's KVM_SIGNAL_MSI, on events INT_EVENTS and up, counted separately.
 */
#include "abi.h"
#include "abi_aarch64.h"
#include "gic.h"

#define SPIN_SECONDS 1 /* how long a register may take to settle before we call it a failure */

static inline void report(u64 *status, int word, u64 value)
{
	__atomic_store_n(&status[word], value, __ATOMIC_RELEASE);
}

static inline u64 reported(const u64 *status, int word)
{
	return __atomic_load_n(&status[word], __ATOMIC_RELAXED);
}

static inline void bump(u64 *status, int word)
{
	report(status, word, reported(status, word) + 1);
}

static int fail(struct lpi *l, u64 error, u64 detail)
{
	report(l->status, WLA_S_ITS_ERROR, error);
	report(l->status, WLA_S_ITS_DETAIL, detail);
	report(l->status, WLA_S_ITS_STATE, WLA_ITS_FAILED);
	l->ready = 0;
	return 0;
}

/* Waits until (read(addr) & mask) == want; 0 after SPIN_SECONDS of counter time. */
static int wait32(const struct lpi *l, u64 addr, u32 mask, u32 want)
{
	u64 start = counter();
	while ((mmio_r32(addr) & mask) != want) {
		if (counter() - start > SPIN_SECONDS * l->counter_hz)
			return 0;
		cpu_relax();
	}
	return 1;
}

/* ---- the command queue ------------------------------------------------------------------ */

/* Writes one command, publishes it through GITS_CWRITER and waits until the ITS consumed it
 * (GITS_CREADR caught up). One command at a time keeps the queue from ever filling. */
static int its_command(struct lpi *l, u64 w0, u64 w1, u64 w2, u64 w3)
{
	u64 *slot = (u64 *)(l->cmdq + l->cwriter);
	slot[0] = w0;
	slot[1] = w1;
	slot[2] = w2;
	slot[3] = w3;
	l->cwriter = (l->cwriter + ITS_CMD_BYTES) % ITS_CMDQ_BYTES;
	dsb_sy();
	mmio_w64(l->its + GITS_CWRITER, l->cwriter);
	u64 start = counter(), creadr;
	while (((creadr = mmio_r64(l->its + GITS_CREADR)) & 0xfffe0) != l->cwriter) {
		if ((creadr & GITS_CREADR_STALLED) || counter() - start > SPIN_SECONDS * l->counter_hz) {
			report(l->status, WLA_S_ITS_CREADR, creadr);
			return fail(l, WLA_ERR_CMD_TIMEOUT, w0 & 0xff);
		}
		cpu_relax();
	}
	report(l->status, WLA_S_ITS_CREADR, creadr);
	bump(l->status, WLA_S_ITS_COMMANDS);
	return 1;
}

/* ---- set-up ------------------------------------------------------------------------------ */

/* Finds the redistributor whose GICR_TYPER.Affinity_Value is this CPU's MPIDR affinity. */
static u64 find_redistributor(u64 gicr, u64 mpidr, u64 *typer_out)
{
	u64 aff = (mpidr & 0xffffff) | ((mpidr >> 32) & 0xff) << 24;
	for (int i = 0; i < 512; i++) {
		u64 typer = mmio_r64(gicr + GICR_TYPER);
		if (typer >> 32 == aff) {
			*typer_out = typer;
			return gicr;
		}
		if (typer & GICR_TYPER_LAST)
			break;
		gicr += (typer & GICR_TYPER_VLPIS) ? GICR_FRAMES_STRIDE_V4 : GICR_FRAMES_STRIDE;
	}
	return 0;
}

static int setup_redistributor(struct lpi *l, u64 rd, u64 typer)
{
	const u64 *p = l->params;
	if (!(typer & GICR_TYPER_PLPIS))
		return fail(l, WLA_ERR_NO_PLPIS, typer);
	u32 ctlr = mmio_r32(rd + GICR_CTLR);
	if (ctlr & GICR_CTLR_ENABLE_LPIS) /* PROPBASER/PENDBASER are read-only now */
		return fail(l, WLA_ERR_LPIS_ENABLED, ctlr);

	/* Wake it (KVM: RAZ/WI, a real GIC needs it before anything is delivered). */
	mmio_w32(rd + GICR_WAKER, mmio_r32(rd + GICR_WAKER) & ~(u32)GICR_WAKER_PROCESSOR_SLEEP);
	if (!wait32(l, rd + GICR_WAKER, GICR_WAKER_CHILDREN_ASLEEP, 0))
		return fail(l, WLA_ERR_WAKER, mmio_r32(rd + GICR_WAKER));

	/* Configuration table: one byte per LPI from INTID 8192 on; only our events are enabled
	 * (the VMM handed the table over zeroed: everything else stays disabled). The ITS reads an
	 * entry when MAPTI maps the LPI, so the table is complete before the first MAPTI. */
	u8 *prop = (u8 *)p[WLA_P_LPI_PROP];
	for (u64 e = 0; e < WLA_EVENTS; e++)
		prop[WLA_LPI_BASE - 8192 + e] = WLA_LPI_PRIORITY | LPI_PROP_RES1 | LPI_PROP_ENABLED;
	dsb_sy();

	u64 propbaser = p[WLA_P_LPI_PROP] | GIC_BASER_SH_INNER | GICR_BASER_INNER_WB |
			(WLA_LPI_ID_BITS - 1);
	mmio_w64(rd + GICR_PROPBASER, propbaser);
	u64 got = mmio_r64(rd + GICR_PROPBASER);
	if (GICR_PROPBASER_ADDR(got) != p[WLA_P_LPI_PROP] || (got & 0x1f) < WLA_LPI_ID_BITS - 1)
		return fail(l, WLA_ERR_PROPBASER, got);

	/* Pending table: 2^14 bits, zero as handed over (PTZ says so, the GIC need not read it). */
	u64 pendbaser = p[WLA_P_LPI_PEND] | GIC_BASER_SH_INNER | GICR_BASER_INNER_WB |
			GICR_PENDBASER_PTZ;
	mmio_w64(rd + GICR_PENDBASER, pendbaser);
	got = mmio_r64(rd + GICR_PENDBASER);
	if (GICR_PENDBASER_ADDR(got) != p[WLA_P_LPI_PEND])
		return fail(l, WLA_ERR_PENDBASER, got);

	dsb_sy();
	mmio_w32(rd + GICR_CTLR, mmio_r32(rd + GICR_CTLR) | GICR_CTLR_ENABLE_LPIS);
	if (!wait32(l, rd + GICR_CTLR, GICR_CTLR_RWP, 0))
		return fail(l, WLA_ERR_RWP, mmio_r32(rd + GICR_CTLR));
	return 1;
}

static void setup_cpu_interface(void)
{
	write_sysreg(ICC_SRE_EL1, read_sysreg(ICC_SRE_EL1) | 1); /* SRE: system registers */
	isb();
	write_sysreg(ICC_PMR_EL1, 0xff); /* let every priority through */
	write_sysreg(ICC_BPR1_EL1, 0);
	write_sysreg(ICC_CTLR_EL1, read_sysreg(ICC_CTLR_EL1) & ~2ULL); /* EOImode 0 */
	write_sysreg(ICC_IGRPEN1_EL1, 1);
	isb();
}

/* Programs one GITS_BASER<n> for a flat table of one 64 KiB page at `table`; returns the entry
 * size, 0 if the register did not take the value. */
static u64 setup_table(struct lpi *l, u64 reg, u64 table, u64 id)
{
	u64 v = mmio_r64(reg);
	u64 esz = GITS_BASER_ENTRY_SIZE(v);
	u64 want = GITS_BASER_VALID | GITS_BASER_INNER_WB | GIC_BASER_SH_INNER |
		   GITS_BASER_PAGE_SIZE_64K | table; /* Size 0: one page */
	mmio_w64(reg, want);
	u64 got = mmio_r64(reg);
	if (!(got & GITS_BASER_VALID) || (got & GITS_BASER_INDIRECT) ||
	    (got & GITS_BASER_PAGE_SIZE_MASK) != GITS_BASER_PAGE_SIZE_64K ||
	    GITS_BASER_ADDR_64K(got) != table || (got & GITS_BASER_SIZE_MASK) != 0 ||
	    (id + 1) * esz > ITS_TABLE_BYTES) {
		fail(l, WLA_ERR_BASER, got);
		return 0;
	}
	return esz;
}

static int setup_its(struct lpi *l, u64 rd, u64 rd_typer)
{
	const u64 *p = l->params;
	u64 typer = mmio_r64(l->its + GITS_TYPER);
	if (!(typer & GITS_TYPER_PHYSICAL) || GITS_TYPER_ID_BITS(typer) < WLA_EVENT_BITS ||
	    l->device >> GITS_TYPER_DEV_BITS(typer) ||
	    GITS_TYPER_ITT_ENTRY_SIZE(typer) * WLA_EVENTS > ITS_ITT_BYTES)
		return fail(l, WLA_ERR_ITS_TYPER, typer);
	u32 ctlr = mmio_r32(l->its + GITS_CTLR);
	if (ctlr & GITS_CTLR_ENABLED) /* the tables and the queue are fixed while enabled */
		return fail(l, WLA_ERR_ITS_ENABLED, ctlr);
	/* MAPC and SYNC name a redistributor by its physical address (GITS_TYPER.PTA = 1) or by
	 * its processor number (PTA = 0, KVM's choice), in both cases from bit 16 of word 2. */
	l->rdbase = (typer & GITS_TYPER_PTA) ? rd >> 16 : (rd_typer >> 8) & 0xffff;

	int device = 0, collection = 0;
	for (int n = 0; n < 8; n++) {
		u64 reg = l->its + GITS_BASER(n);
		u64 type = GITS_BASER_TYPE(mmio_r64(reg));
		if (type == GITS_BASER_TYPE_DEVICE && !device) {
			if (!setup_table(l, reg, p[WLA_P_ITS_DEVICE_TABLE], l->device))
				return 0;
			device = 1;
		} else if (type == GITS_BASER_TYPE_COLLECTION && !collection) {
			if (!setup_table(l, reg, p[WLA_P_ITS_COLL_TABLE], WLA_ICID))
				return 0;
			collection = 1;
		}
	}
	if (!device || !collection)
		return fail(l, WLA_ERR_NO_TABLE, (u64)device | (u64)collection << 1);

	u64 cbaser = GITS_BASER_VALID | GITS_BASER_INNER_WB | GIC_BASER_SH_INNER | l->cmdq;
	mmio_w64(l->its + GITS_CBASER, cbaser); /* resets GITS_CREADR to 0 */
	u64 got = mmio_r64(l->its + GITS_CBASER);
	if (!(got & GITS_BASER_VALID) || GITS_CBASER_ADDR(got) != l->cmdq ||
	    (got & GITS_CBASER_SIZE_MASK) != 0)
		return fail(l, WLA_ERR_CBASER, got);
	l->cwriter = 0;
	mmio_w64(l->its + GITS_CWRITER, 0);

	mmio_w32(l->its + GITS_CTLR, GITS_CTLR_ENABLED);
	ctlr = mmio_r32(l->its + GITS_CTLR);
	if (!(ctlr & GITS_CTLR_ENABLED))
		return fail(l, WLA_ERR_ITS_ENABLE, ctlr);

	u64 dev = l->device << 32;
	if (!its_command(l, ITS_CMD_MAPD | dev, WLA_EVENT_BITS - 1,
			 ITS_CMD_VALID | (p[WLA_P_ITS_ITT] & 0x000fffffffffff00ULL), 0))
		return 0;
	if (!its_command(l, ITS_CMD_MAPC, 0, ITS_CMD_VALID | l->rdbase << 16 | WLA_ICID, 0))
		return 0;
	for (u64 e = 0; e < WLA_EVENTS; e++)
		if (!its_command(l, ITS_CMD_MAPTI | dev, e | (WLA_LPI_BASE + e) << 32, WLA_ICID, 0))
			return 0;
	return its_command(l, ITS_CMD_SYNC, 0, l->rdbase << 16, 0);
}

int lpi_setup(struct lpi *l, u64 *status, const u64 *params, u64 counter_hz)
{
	*l = (struct lpi){
		.status = status,
		.params = params,
		.counter_hz = counter_hz,
		.its = params[WLA_P_ITS_BASE],
		.cmdq = params[WLA_P_ITS_CMDQ],
		.device = params[WLA_P_ITS_DEVICE_ID],
	};
	report(status, WLA_S_ITS_STATE, WLA_ITS_PROGRAMMING);

	u64 gicd = params[WLA_P_GICD_BASE];
	mmio_w32(gicd + GICD_CTLR, GICD_CTLR_ARE | GICD_CTLR_ENABLE_G1 | GICD_CTLR_ENABLE_G0);
	if (!wait32(l, gicd + GICD_CTLR, GICD_CTLR_RWP, 0))
		return fail(l, WLA_ERR_RWP, mmio_r32(gicd + GICD_CTLR));

	u64 mpidr = read_sysreg(mpidr_el1), rd_typer = 0;
	u64 rd = find_redistributor(params[WLA_P_GICR_BASE], mpidr, &rd_typer);
	if (!rd)
		return fail(l, WLA_ERR_NO_REDIST, mpidr);
	report(status, WLA_S_REDIST, rd);
	if (!setup_redistributor(l, rd, rd_typer))
		return 0;
	setup_cpu_interface();
	if (!setup_its(l, rd, rd_typer))
		return 0;

	l->ready = 1;
	l->last_int = counter();
	report(status, WLA_S_ITS_STATE, WLA_ITS_READY);
	return 1;
}

/* ---- running ----------------------------------------------------------------------------- */

static void acknowledge(struct lpi *l)
{
	for (int i = 0; i < 64; i++) {
		u64 intid = read_sysreg(ICC_IAR1_EL1) & 0xffffff;
		if (intid >= INTID_SPURIOUS_FIRST && intid < INTID_SPURIOUS_FIRST + 4)
			return;
		write_sysreg(ICC_EOIR1_EL1, intid);
		report(l->status, WLA_S_LAST_INTID, intid);
		u64 e = intid - WLA_LPI_BASE; /* wraps for INTIDs below the base */
		if (e < WLA_INT_EVENTS && (l->outstanding & BIT(e))) {
			/* Counted before the bit clears: a VMM that sees nothing outstanding must
			 * already see the count that goes with it. */
			bump(l->status, WLA_S_LPIS_RECEIVED);
			l->outstanding &= ~BIT(e);
			report(l->status, WLA_S_LPI_OUTSTANDING, l->outstanding);
		} else if (e >= WLA_INT_EVENTS && e < WLA_EVENTS) {
			bump(l->status, WLA_S_MSIS_RECEIVED);
		} else {
			bump(l->status, WLA_S_LPIS_UNEXPECTED);
		}
	}
}

static void send_int(struct lpi *l)
{
	for (u64 tries = 0; tries < WLA_INT_EVENTS; tries++) {
		u64 e = l->next_event;
		l->next_event = (e + 1) % WLA_INT_EVENTS;
		if (l->outstanding & BIT(e))
			continue;
		/* Outstanding before the ITS sees the command: the LPI can only be acknowledged by
		 * this vCPU, after its_command returns, but the bookkeeping must not depend on it. */
		l->outstanding |= BIT(e);
		report(l->status, WLA_S_LPI_OUTSTANDING, l->outstanding);
		if (its_command(l, ITS_CMD_INT | l->device << 32, e, 0, 0))
			bump(l->status, WLA_S_LPIS_EXPECTED);
		return;
	}
	bump(l->status, WLA_S_LPI_STALLS);
}

void lpi_poll(struct lpi *l, u64 now)
{
	if (!l->ready)
		return;
	/* Held: LPIs stay pending, so a save finds them in the pending table. */
	int hold = __atomic_load_n(&l->params[WLA_P_LPI_HOLD], __ATOMIC_ACQUIRE) != 0;
	if (!hold)
		acknowledge(l);
	u64 rate = __atomic_load_n(&l->params[WLA_P_LPI_RATE], __ATOMIC_ACQUIRE);
	if (rate != l->rate) {
		l->rate = rate;
		l->period = rate ? l->counter_hz / rate : 0;
		if (rate && !l->period)
			l->period = 1;
		l->last_int = now;
		report(l->status, WLA_S_LPI_RATE_SEEN, rate);
	}
	if (!l->period || now - l->last_int < l->period)
		return;
	/* Behind by more than ~10 ms of INTs (paused, or a rate beyond us): forgive, no burst. */
	if (now - l->last_int > l->period + l->counter_hz / 100)
		l->last_int = now;
	else
		l->last_int += l->period;
	send_int(l);
	if (l->ready && !hold)
		acknowledge(l);
}
