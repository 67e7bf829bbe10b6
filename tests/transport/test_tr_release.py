"""A finished connection gives its receive buffers back (the daemon keeps finished incoming
migrations for in-doubt queries; with the buffers, each kept one held a whole batch buffer)."""

from __future__ import annotations

import gc
import tracemalloc

from tr_helpers import KEY, batch, description, handshake, transfer

from transport import Accept, Connection, PageBatch, Role


def test_release_buffers_frees_the_page_buffer_and_keeps_the_state() -> None:
    source = Connection(Role.SOURCE, node="host-a", psk=KEY)
    target = Connection(Role.TARGET, node="host-b", psk=KEY, reuse_page_buffer=True)
    handshake(source, target)
    transfer(source, target, description())
    transfer(target, source, Accept())
    tracemalloc.start()
    try:
        pages = list(range(64))
        (received,) = transfer(source, target, batch(0, pages))
        assert isinstance(received, PageBatch) and received.pages.size == len(pages)
        del received
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
        state = target.state
        target.release_buffers()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held - after >= len(pages) * 4096, (held, after)  # at least the batch's page data
    assert target.state is state
