"""The data plane's stream threads wired over loopback in one process, for the benches that time
them (dataplane_cpu.py, small_copy.py). The caller has put the checkout under test on sys.path;
its modules are imported here only when called, so each bench times the checkout it chose."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def loopback_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """`count` connected (client, server) TCP pairs on 127.0.0.1, with Nagle off as the daemon has."""
    listener = socket.create_server(("127.0.0.1", 0))
    pairs = []
    for _ in range(count):
        client = socket.create_connection(listener.getsockname())
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pairs.append((client, listener.accept()[0]))
    listener.close()
    return pairs


def receive_threads(
    pairs: list[tuple[socket.socket, socket.socket]],
    target: Any,
    make_receiver: Callable[[int], Any],
    on_end: Callable[[], None],
    on_error: Callable[[object], None],
    wrap: Callable[[socket.socket], Any] = lambda sock: sock,
) -> list[Any]:
    """One receiving thread per pair's server side, all applying into `target` (GuestMemory):
    `on_end` when a stream's end marker was applied, `on_error` with a stream's failure."""
    from migrated.migration import recvstreams

    applier = recvstreams._Applier(target)  # type: ignore[attr-defined]
    return [
        recvstreams._ReceiveThread(  # type: ignore[attr-defined]
            wrap(server),
            make_receiver(index),
            applier,
            60.0,
            lambda index: on_end(),
            lambda index, message: (on_error(message), on_end()),
        )
        for index, (_, server) in enumerate(pairs)
    ]
