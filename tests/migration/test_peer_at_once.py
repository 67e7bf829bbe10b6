"""The downtime's messages written at once (PeerChannel `at_once`, peer.py `_write_at_once`): one
write(2) into the socket instead of trio's send_all, on a real TCP connection. What does not fit
follows in order through send_all; and while another send of the channel is under way nothing is
written at once, so the bytes of two messages never interleave."""

from __future__ import annotations

import os
import select
import socket

import numpy as np
import pytest
import trio
import trio.testing

from migrated.peer import PeerChannel
from transport import Accept, PageBatch, Role, VmDescription
from transport import Connection

PAGE = 4096
SLOT_PAGES = 1024


def _description() -> VmDescription:
    return VmDescription(
        name="vm1",
        migration_id="m-at-once",
        memory=((0, 0, SLOT_PAGES * PAGE),),
        vcpus=1,
        guest_kind="workload",
        cpu_features={},
        dirty_tracking="ring",
    )


def _batch(first: int, count: int) -> PageBatch:
    pages = np.arange(first, first + count, dtype=np.uint64)
    # Every page carries its own index: a byte out of place shows in the page it lands in.
    data = np.repeat(pages.astype(np.uint32), PAGE // 4).tobytes()
    return PageBatch(slot=0, round=0, pages=pages, zero_pages=np.empty(0, np.uint64), data=bytearray(data))


async def _pair() -> tuple[PeerChannel, PeerChannel, trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    source = PeerChannel(client, Connection(Role.SOURCE, node="a", allow_unauthenticated=True))
    target = PeerChannel(server, Connection(Role.TARGET, node="b", allow_unauthenticated=True))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.handshake)
        nursery.start_soon(target.handshake)
    await source.send(_description())
    assert isinstance(await target.receive(), VmDescription)
    await target.send(Accept())
    assert isinstance(await source.receive(), Accept)
    return source, target, client, server


def _check_batch(event: object, first: int, count: int) -> None:
    assert isinstance(event, PageBatch)
    assert event.pages.tolist() == list(range(first, first + count))
    words = np.frombuffer(bytes(event.data), dtype=np.uint32).reshape(count, PAGE // 4)
    assert (words == np.arange(first, first + count, dtype=np.uint32)[:, None]).all()


def test_a_message_larger_than_the_socket_takes_goes_out_whole_and_in_order() -> None:
    async def main() -> None:
        source, target, client, server = await _pair()
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        batches = [(0, 256), (256, 256), (512, 256)]  # 3 MiB: far beyond one write's room
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.send_many, [_batch(f, n) for f, n in batches], True)
            for first, count in batches:
                _check_batch(await target.receive(), first, count)
        assert source.bytes_sent == target.conn.bytes_received, "every byte counted once"
        for stream in (client, server):
            await stream.aclose()

    trio.run(main)


def test_nothing_is_written_at_once_while_another_send_is_under_way() -> None:
    async def main() -> None:
        source, target, client, server = await _pair()
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        blocked = trio.Event()

        async def big_send() -> None:
            blocked.set()
            await source.send(_batch(0, 512))  # the target reads nothing: send_all waits

        async with trio.open_nursery() as nursery:
            nursery.start_soon(big_send)
            await blocked.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert source._sends_under_way == 1, "precondition: the first send waits in send_all"
            # Room in the socket again, read past trio (no checkpoint: the waiting send_all
            # cannot run before the next send): a write at once would now land mid-message.
            while not select.select([], [client.socket.fileno()], [], 0)[1]:
                os.read(server.socket.fileno(), 1 << 16)
            sent = source.bytes_sent
            # Refused as any second concurrent send is (trio's send_all), not written.
            with pytest.raises(trio.BusyResourceError):
                await source.send(_batch(512, 1), at_once=True)
            assert source.bytes_sent == sent, "not a byte of it went out"
            nursery.cancel_scope.cancel()
        for stream in (client, server):
            await stream.aclose()

    trio.run(main)
