"""The round trip a first migration's prediction prices (policy.first_round_trip_ms), and the
link's own round trip as the kernel measures it (PeerChannel.link_rtt_ms), on a real socket."""

from __future__ import annotations

import trio
import trio.testing

from migrated.migration.policy import CUTOVER_WAKEUPS_MS, first_round_trip_ms
from migrated.peer import PeerChannel
from transport import Connection, Role


def test_the_first_round_trip_is_the_handshakes_or_the_links_own_with_the_wakeups() -> None:
    # A handshake that waited for a busy host: the link's latency plus the raised wake-ups.
    assert first_round_trip_ms(24.0, 0.03) == 0.03 + CUTOVER_WAKEUPS_MS
    # A long link: its latency is in both, and the handshake's is no worse.
    assert first_round_trip_ms(41.0, 40.0) == 41.0
    assert first_round_trip_ms(3.0, None) == 3.0, "no kernel figure: the handshake's"


def _channel(stream: trio.abc.Stream) -> PeerChannel:
    return PeerChannel(stream, Connection(Role.SOURCE, node="test", allow_unauthenticated=True))


def test_the_kernel_times_a_tcp_links_round_trip_and_nothing_else() -> None:
    async def main() -> tuple[float | None, float | None]:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
        for _ in range(4):  # a few exchanges give the kernel its samples
            await client.send_all(b"x")
            assert await server.receive_some(1) == b"x"
            await server.send_all(b"y")
            assert await client.receive_some(1) == b"y"
        tcp = _channel(client).link_rtt_ms()
        memory = _channel(trio.testing.memory_stream_pair()[0]).link_rtt_ms()
        for resource in (client, server, *listeners):
            await resource.aclose()
        return tcp, memory

    tcp, memory = trio.run(main)
    assert tcp is not None and tcp > 0, "loopback TCP: the kernel's least RTT sample"
    assert memory is None, "no socket: no figure rather than a guess"
