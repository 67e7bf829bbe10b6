"""Pages between guest RAM and the wire, in batches, never one Python object per page.

Source: a batch is a block of RAM. In the bulk copy it is a contiguous range, sent straight from
guest RAM (a view, no copy) when it holds no zero page; in dirty rounds the pages are gathered
with one numpy take. Zero pages travel as indices only. Target: one slice assignment or one
scatter per batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from transport import PageBatch

from ..pagehash import nonzero_pages

PAGE_SIZE = 4096

Pages = npt.NDArray[np.uint64]
SendBatch = Callable[[PageBatch], Awaitable[None]]


@dataclass
class StreamCounters:
    batches: int = 0
    pages: int = 0  # pages sent with data
    zero_pages: int = 0
    data_bytes: int = 0


def _split_zero(block: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """True for each page (row) of `block` that holds a non-zero byte.

    The C loop of the pagehash shim: a page whose first word is non-zero is decided by that word
    (one cache line read: a guest's data pages nearly all qualify), the rest are read whole,
    nothing copied, the GIL released; 1.4-1.7x numpy's first-word-then-`max` (which copied the
    doubtful rows out first) on allocated zero pages (bench/zero_scan.py)."""
    return nonzero_pages(block.reshape(-1))


async def _send_block(
    send: SendBatch,
    slot: int,
    round_: int,
    first_pages: Pages,
    block: npt.NDArray[np.uint8],
    counters: StreamCounters,
) -> None:
    nonzero = _split_zero(block)
    if nonzero.all():
        pages, zero, data = first_pages, np.empty(0, np.uint64), block
    else:
        pages, zero = first_pages[nonzero], first_pages[~nonzero]
        data = block[nonzero]
    await send(PageBatch(slot=slot, round=round_, pages=pages, zero_pages=zero, data=data.reshape(-1).data))
    counters.batches += 1
    counters.pages += int(pages.size)
    counters.zero_pages += int(zero.size)
    counters.data_bytes += int(pages.size) * PAGE_SIZE


async def send_range(
    send: SendBatch,
    ram_pages: npt.NDArray[np.uint8],
    slot: int,
    round_: int,
    first: int,
    end: int,
    batch_pages: int,
    counters: StreamCounters,
) -> None:
    """Pages [first, end) of a slot, in order, in batches: the bulk copy."""
    for start in range(first, end, batch_pages):
        stop = min(start + batch_pages, end)
        await _send_block(send, slot, round_, np.arange(start, stop, dtype=np.uint64), ram_pages[start:stop], counters)


async def send_pages(
    send: SendBatch,
    ram_pages: npt.NDArray[np.uint8],
    slot: int,
    round_: int,
    pages: Pages,
    batch_pages: int,
    counters: StreamCounters,
) -> None:
    """The given pages of a slot (a dirty set), sorted for locality, gathered per batch."""
    ordered = np.sort(pages)
    for start in range(0, ordered.size, batch_pages):
        chunk = ordered[start : start + batch_pages]
        await _send_block(send, slot, round_, chunk, ram_pages[chunk.astype(np.intp)], counters)


def apply_batch(ram_pages: npt.NDArray[np.uint8], batch: PageBatch, ram_is_fresh: bool) -> None:
    """Write one received batch into guest RAM (`ram_pages`: the slot as (pages, 4096) uint8).

    The transport checked every index against the slot before this point. Zero pages are
    written only when the RAM may hold something else there (`ram_is_fresh` is False): writing
    zeros into a fresh memfd would allocate what the guest never touched.
    """
    pages = batch.pages
    if pages.size:
        data = np.frombuffer(batch.data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        first = int(pages[0])
        if int(pages[-1]) - first + 1 == pages.size and (pages.size == 1 or bool(np.all(np.diff(pages) == 1))):
            ram_pages[first : first + pages.size] = data
        else:
            ram_pages[pages.astype(np.intp)] = data
    if batch.zero_pages.size and not ram_is_fresh:
        ram_pages[batch.zero_pages.astype(np.intp)] = 0
