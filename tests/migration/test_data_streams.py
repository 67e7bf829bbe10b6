"""The data plane alone: SendStreams and ReceiveStreams over real loopback TCP, real threads,
real guest-RAM files (no VM: the pages are what matters here), and the daemon's own accept path.

The ordering rule (transport/datastream.py rule 4) is shown where it could break: the same pages
sent in several rounds across four streams, some becoming zero, end with their newest content."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from migrated.kvm.dirty import DirtyPages
from migrated.kvm.memory import GuestMemory
from migrated.migration.recvstreams import ReceiveStreams, accept_hello
from migrated.migration.sendstreams import CHUNK_SHIFT, SendStreams, chunk_runs, group_runs, stream_of
from transport.datastream import Layout, stream_secret

PAGE = 4096
MIB = 1 << 20


@dataclass(frozen=True)
class _Peer:
    """The two PeerConfig fields the data plane reads; psk or none (TLS has its own tests)."""

    auth: str
    connect_timeout_s: float = 10.0


def _fill(memory: GuestMemory, seed: int) -> None:
    rng = np.random.default_rng(seed)
    memory.bytes[:] = rng.integers(1, 255, memory.size, dtype=np.uint8)


@asynccontextmanager
async def _plane(
    src: GuestMemory, dst: GuestMemory, count: int, sealed: bool, batch_pages: int = 200
) -> AsyncIterator[tuple[SendStreams, ReceiveStreams, list[str]]]:
    """Both planes, connected; on leaving, pass or fail, every stream thread is joined. The
    caller unmaps the RAM they read and write right after: a thread left sealing from
    unmapped RAM crashed the whole test run once (a test had failed before its own aclose)."""
    async with trio.open_nursery() as nursery:
        send, receive, failures = await _connect(src, dst, count, sealed, nursery, batch_pages)
        try:
            yield send, receive, failures
        finally:
            with trio.CancelScope(shield=True):
                await send.aclose()
                await receive.aclose()
            nursery.cancel_scope.cancel()


async def _connect(
    src: GuestMemory, dst: GuestMemory, count: int, sealed: bool, nursery: trio.Nursery, batch_pages: int
) -> tuple[SendStreams, ReceiveStreams, list[str]]:
    secret = stream_secret(os.urandom(32) if sealed else None, os.urandom(32), os.urandom(32))
    layout = Layout({0: src.size // PAGE}, PAGE, 1 * MIB)
    peer: Any = _Peer("psk" if sealed else "none")
    failures: list[str] = []
    receive = ReceiveStreams(count, secret, layout, sealed=sealed, memory=dst, io_timeout_s=10)
    receive.on_failure = failures.append
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        hello, sock = await accept_hello(stream, peer)
        receive.attach(hello, sock)

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    send = await SendStreams.open(
        host="127.0.0.1",
        port=port,
        peer=peer,
        secret=secret,
        sealed=sealed,
        migration_id="m-test-1",
        count=count,
        memory=src,
        layout=layout,
        batch_pages=batch_pages,
        bandwidth_bytes_s=0,
    )
    with trio.fail_after(30):
        while len(receive._threads) < count:
            await trio.sleep(0.01)
    return send, receive, failures


def test_chunks_map_each_page_to_one_stream() -> None:
    extents = [(3, 1500), (2000, 2100)]
    covered = []
    for index in range(3):
        for first, end in chunk_runs(extents, index, 3, 200):
            assert end - first <= 200
            pages = np.arange(first, end, dtype=np.uint64)
            assert (stream_of(pages, 3) == index).all()
            covered.extend(range(first, end))
    assert sorted(covered) == [*range(3, 1500), *range(2000, 2100)]
    assert int(stream_of(np.array([(5 << CHUNK_SHIFT) + 1], np.uint64), 4)[0]) == 1


def test_runs_are_grouped_in_order_up_to_the_batch_size() -> None:
    runs = [(0, 50), (512, 562), (1024, 1224), (1536, 1546), (2048, 2248)]
    assert group_runs(runs, 250) == [[(0, 50), (512, 562)], [(1024, 1224), (1536, 1546)], [(2048, 2248)]]
    assert group_runs(runs[2:3], 200) == [[(1024, 1224)]]
    assert group_runs([], 200) == []


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "clear"])
def test_a_bulk_copy_of_scattered_extents_sends_several_runs_per_batch(sealed: bool) -> None:
    """A sparse guest's extents over three streams: a stream's runs share a batch (one record),
    each run's data straight from guest RAM, its zero pages taken out; every page lands."""
    src, dst = GuestMemory.flat(16 * MIB, "src"), GuestMemory.flat(16 * MIB, "dst")
    try:
        _fill(src, 4)
        ram = src.bytes.reshape(-1, PAGE)
        extents = [(first, first + 50) for first in range(0, ram.shape[0] - 50, 300)]
        ram[[first + 7 for first, _ in extents[::3]]] = 0  # zero pages inside runs
        ram[extents[1][0] : extents[1][1]] = 0  # a whole run of zero pages
        runs = sum(len(chunk_runs(extents, index, 3, 240)) for index in range(3))

        async def main() -> None:
            async with _plane(src, dst, 3, sealed, batch_pages=240) as (send, receive, failures):
                await send.send_extents({0: extents}, 0)
                await send.end()
                with trio.fail_after(60):
                    await receive.wait_ended()
                assert failures == []
                total = send.totals()
                assert total.batches < runs / 2, (total.batches, runs)  # grouped, not one per run
                assert total.zero_pages == len(extents[::3]) + 50  # extents[1] is not among extents[::3]

        trio.run(main)
        sent = np.zeros(ram.shape[0], bool)
        for first, end in extents:
            sent[first:end] = True
        got = dst.bytes.reshape(-1, PAGE)
        assert np.array_equal(got[sent], ram[sent])
        assert not got[~sent].any()  # nothing outside the extents was written
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "clear"])
def test_pages_sent_in_several_rounds_end_with_their_newest_content(sealed: bool) -> None:
    src, dst = GuestMemory.flat(32 * MIB, "src"), GuestMemory.flat(32 * MIB, "dst")
    try:
        _fill(src, 1)
        ram = src.bytes.reshape(-1, PAGE)
        pages = ram.shape[0]
        rng = np.random.default_rng(2)

        async def main() -> None:
            async with _plane(src, dst, 4, sealed) as (send, receive, failures):
                await send.send_extents({0: [(0, pages)]}, 0)
                runs = np.concatenate((np.arange(100, 2000), np.arange(5000, 5600), [7000])).astype(np.uint64)
                for round_ in (1, 2, 3, 4):
                    # Scattered pages (one gather per batch), then long runs (sent run by run).
                    dirty = np.unique(rng.integers(0, pages, 3000).astype(np.uint64)) if round_ < 4 else runs
                    # Rewrite them (some to zero: the target must write zeros over old data).
                    ram[dirty.astype(np.intp)] = round_ * 17
                    ram[dirty[::5].astype(np.intp)] = 0
                    await send.send_pages(DirtyPages({0: dirty}), round_)
                await send.end()
                with trio.fail_after(60):
                    await receive.wait_ended()
                assert failures == []
                total = send.totals()
                assert total.batches > 4 and total.zero_pages > 0

        trio.run(main)
        differ = np.flatnonzero((src.bytes.reshape(-1, PAGE) != dst.bytes.reshape(-1, PAGE)).any(axis=1))
        assert differ.size == 0, f"{differ.size} pages differ, first {differ[:5]}"
    finally:
        src.close()
        dst.close()


def test_a_broken_stream_is_reported_and_closing_stops_every_thread() -> None:
    """A stream cut mid-pass: the receiver reports it, the sender's pass fails with it, and both
    planes close with every thread joined (a bandwidth limit keeps the pass going meanwhile)."""
    src, dst = GuestMemory.flat(16 * MIB, "src"), GuestMemory.flat(16 * MIB, "dst")
    threads_before = threading.active_count()
    try:
        _fill(src, 3)

        async def main() -> None:
            async with _plane(src, dst, 2, True) as (send, receive, failures):
                send.limiter.set_rate(4 * MIB)  # the pass takes seconds: time to cut it
                async with trio.open_nursery() as inner:
                    outcome: list[BaseException] = []

                    async def pass_() -> None:
                        try:
                            await send.send_extents({0: [(0, src.size // PAGE)]}, 0)
                        except OSError as err:
                            outcome.append(err)

                    inner.start_soon(pass_)
                    with trio.fail_after(30):
                        while send.totals().batches < 2:
                            await trio.sleep(0.01)
                    # Cut one stream under the sender's feet, as a broken link would.
                    receive._threads[1].sock.shutdown(2)
                    with trio.fail_after(30):
                        while not failures:
                            await trio.sleep(0.01)
                    await send.aclose()
                assert outcome, "the pass ended without an error although a stream was cut"

        trio.run(main)
        assert threading.active_count() <= threads_before, "a data stream thread outlived its plane"
    finally:
        src.close()
        dst.close()


def test_two_waiters_of_the_streams_end_are_both_woken() -> None:
    """`wait_ended` with two waiters at once: each stream's end wakes both, and neither is left
    on an event that the next wake-up no longer sets (a waiter that renewed the event did that)."""
    src, dst = GuestMemory.flat(4 * MIB, "src"), GuestMemory.flat(4 * MIB, "dst")
    try:
        _fill(src, 5)
        woken: list[str] = []

        async def main() -> None:
            async with _plane(src, dst, 3, True) as (send, receive, failures):

                async def wait(name: str) -> None:
                    await receive.wait_ended()
                    woken.append(name)

                with trio.fail_after(60):  # the waiters' nursery ends only when both returned
                    async with trio.open_nursery() as waiters:
                        waiters.start_soon(wait, "first")
                        waiters.start_soon(wait, "second")
                        await trio.testing.wait_all_tasks_blocked()
                        assert woken == [] and not receive.all_ended  # both wait before any end
                        await send.send_extents({0: [(0, src.size // PAGE)]}, 0)
                        await send.end()
                assert sorted(woken) == ["first", "second"] and failures == []

        trio.run(main)
        np.testing.assert_array_equal(dst.bytes, src.bytes)
    finally:
        src.close()
        dst.close()


def test_the_links_watch_counts_bytes_that_arrived_while_a_record_is_still_incomplete() -> None:
    """A receive thread waits in the kernel for a whole record (blocking.RecordReads) and counts
    its bytes when the record is in. Under a low bandwidth cap a record takes longer than the link's
    silence window, so the watch reads what the kernel took in: here a paced pass whose first
    record (0.94 MiB) the thread has counted nothing of while the kernel has taken in a quarter."""
    src, dst = GuestMemory.flat(1 * MIB, "src"), GuestMemory.flat(1 * MIB, "dst")
    try:
        _fill(src, 4)

        async def main() -> None:
            async with _plane(src, dst, 1, True, batch_pages=240) as (send, receive, failures):
                arrived_before = receive.arrived_bytes()
                send.limiter.set_rate(1 * MIB)  # the record takes about a second
                async with trio.open_nursery() as inner:
                    inner.start_soon(send.send_extents, {0: [(0, src.size // PAGE)]}, 0)
                    with trio.fail_after(30):
                        while receive.arrived_bytes() - arrived_before < 256 << 10:
                            await trio.sleep(0.01)
                    # Its own count: at most the record's length prefix, read apart.
                    assert receive.totals()[2] < 64, "precondition: the record is not in yet"
                    with trio.fail_after(30):
                        while receive.totals()[2] < 64:
                            await trio.sleep(0.01)
                # The pass is sent; the receive thread may still be reading its last record.
                with trio.fail_after(30):
                    while sum(receive.totals()[:2]) < src.size // PAGE:
                        await trio.sleep(0.01)
                assert receive.arrived_bytes() >= receive.totals()[2] > 1 * MIB
                assert not failures, failures

        trio.run(main)
        assert (dst.bytes == src.bytes).all()
    finally:
        src.close()
        dst.close()
