"""The downtime's final pages on the control connection (capability final-pages-on-control).

A small final set goes in the state's write instead of on the data streams: the source ended the
streams before its pause and the target reported them applied (DESIGN R6, docs/design.md), so
the downtime waits for no stream thread on either side. The pages are read from guest RAM after
R6.2's reset, in batches, never one Python object per page (pagestream.py).
"""

from __future__ import annotations

from transport import PageBatch

from ..kvm.dirty import DirtyPages
from ..kvm.memory import GuestMemory
from .pagestream import PAGE_SIZE, StreamCounters, send_pages

# A final set the prediction expects to be at most this many pages goes on the control connection
# (`Source._final_pages_on_control`): 1 MiB, a few hundred microseconds in one write, where the
# data streams took 3-7 ms after the bulk copy before the target had applied what they carried
# (bench/timeline.py, a busy host).
CONTROL_FINAL_MAX_PAGES = 256


async def final_batches_of(
    memory: GuestMemory, dirty: DirtyPages, round_: int, batch_pages: int, counters: StreamCounters
) -> list[PageBatch]:
    """The pages of `dirty` as PageBatches of `round_`, read from `memory` now; `counters` count them."""
    batches: list[PageBatch] = []

    async def collect(batch: PageBatch) -> None:
        batches.append(batch)

    regions = {r.slot: r for r in memory.regions}
    for slot, pages in dirty.by_slot.items():
        if pages.size:
            ram = memory.view(regions[slot]).reshape(-1, PAGE_SIZE)
            await send_pages(collect, ram, slot, round_, pages, batch_pages, counters)
    return batches
