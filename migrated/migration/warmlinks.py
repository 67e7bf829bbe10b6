"""Warm peer links (the source side): after a migration to a peer, one fresh, fully
authenticated link to it is opened in the background and kept idle, so that the next migration
there sends its VM description at once, without the connect and the handshake on its setup
(what a host evacuation, dozens of VMs to one peer in a row, pays for every VM otherwise).

Rules of this file:

- A link is opened exactly as a migration's own (TCP, TLS or the PSK handshake with fresh
  nonces both ways, so fresh keys), announced as idle in its Hello (peer.py IDLE_LINK), then
  its data streams (migration.streams), their hellos named by a fresh link id and proved by
  this link's stream secret (the target holds them for the link: idlelinks.py). It carries one
  migration: `take` hands it out once, with all its streams or not at all, and forgets it; the
  migration closes it.
- At most one idle link (or one being opened) per peer address. Opening never holds anything
  up: it runs in this pool's own nursery, and a migration that finds no idle link connects as
  it always did.
- A link the peer closed (its idle deadline, a restart, a refusal over its limits) is noticed
  by a watcher (the socket turns readable: an idle target sends nothing) and closed here; `take`
  checks once more, with a zero-timeout poll, so a dead link is not handed out. Only a close in
  flight at that moment remains: the migration falls back to a fresh connection (outgoing_setup.py).
- Everything ends with the daemon: the nursery is cancelled, every idle link closed.
"""

from __future__ import annotations

import secrets
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from transport import Role

from .. import faults
from ..config import Config
from ..logs import get_logger
from ..peer import PeerChannel, PeerError, make_connection
from .idlelinks import is_idle_link
from .peerconnect import connect_stream
from .sendstreams import connect_streams

Address = tuple[str, int]


@dataclass
class WarmLink:
    """An idle link, and its data streams: connected, their hellos sent under a name of the
    link's own (`link_id`); the target holds them for the link's migration (service.py)."""

    channel: PeerChannel
    streams: list[socket.socket] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)
    watch: trio.CancelScope = field(default_factory=trio.CancelScope)


class WarmLinks:
    def __init__(self, config: Callable[[], Config], node: str) -> None:
        self._config = config  # the daemon's current one (a reload may turn warm links off)
        self._node = node
        self._idle: dict[Address, WarmLink] = {}
        self._opening: set[Address] = set()
        self._nursery: trio.Nursery | None = None
        self.log = get_logger(component="warm_links")

    def idle(self) -> list[str]:
        """HOST:PORT of every idle link, for status and tests."""
        return [f"{host}:{port}" for host, port in self._idle]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            links, self._idle = list(self._idle.values()), {}
            with trio.CancelScope(shield=True):  # the daemon is stopping: each closes at once
                for link in links:
                    await _close(link)
            if links:
                self.log.info("warm_links_closed", links=len(links))

    def warm(self, host: str, port: int) -> None:
        """After a migration to host:port: open a link for the next one there, unless one is
        idle or being opened, warm links are off, or the daemon is stopping."""
        address = (host, port)
        if self._nursery is None or not self._config().peer.warm_links:
            return
        if address in self._idle or address in self._opening:
            return
        self._opening.add(address)
        self._nursery.start_soon(self._open_and_watch, address)

    async def take(self, host: str, port: int, streams: int) -> WarmLink | None:
        """The idle link to host:port with its `streams` data streams, now the caller's (it
        closes them), if the peer has closed none of them; None otherwise. All or nothing:
        the target holds the link's streams for its migration, and streams of the migration's
        own would find their places taken."""
        link = self._idle.pop((host, port), None)
        if link is None:
            return None
        link.watch.cancel()  # no one else waits on its socket from here on
        if not self._config().peer.warm_links or len(link.streams) != streams:
            self.log.info("warm_link_not_used", peer=f"{host}:{port}", streams=len(link.streams), wanted=streams)
            await _close(link)
            return None
        sockets = [_socket_of(link.channel), *link.streams]
        if not all(_quiet(sock) for sock in sockets) and not faults.active("source-warm-link-unwatched"):
            # An idle target sends nothing: EOF, a reset or bytes mean the link is over.
            self.log.info("warm_link_dead", peer=f"{host}:{port}", idle_s=round(time.monotonic() - link.since, 3))
            await _close(link)
            return None
        return link

    async def _open_and_watch(self, address: Address) -> None:
        peer = f"{address[0]}:{address[1]}"
        try:
            link = await self._open(address)
        except (PeerError, OSError, trio.TooSlowError) as err:
            # Nothing lost: the next migration there connects as it always did.
            self.log.info("warm_link_failed", peer=peer, error=str(err) or type(err).__name__)
            return
        except Exception:  # a bug here must not end the pool's nursery, nor the daemon's
            self.log.exception("warm_link_crashed", peer=peer)
            return
        finally:
            self._opening.discard(address)
        if not is_idle_link(link.channel):
            # An older target cuts an idle link off at its connect_timeout_s: no use keeping it.
            self.log.info("warm_link_unsupported", peer=peer)
            await _close(link)
            return
        if not self._config().peer.warm_links or address in self._idle:
            await _close(link)
            return
        self._idle[address] = link
        channel = link.channel
        self.log.info("warm_link_ready", peer=peer, streams=len(link.streams))
        if faults.active("source-warm-link-unwatched"):
            return
        with link.watch:
            await trio.lowlevel.wait_readable(_socket_of(channel))
        if link.watch.cancelled_caught:
            return  # taken: the migration owns it now
        if self._idle.get(address) is link:
            del self._idle[address]
        self.log.info("warm_link_closed_by_peer", peer=peer, idle_s=round(time.monotonic() - link.since, 3))
        await _close(link)

    async def _open(self, address: Address) -> WarmLink:
        """The link and, once it is authenticated, its data streams (as many as a migration
        opens by default, migration.streams), named by a fresh link id: the migration that
        takes the link need not connect them (outgoing_setup.py)."""
        config = self._config()
        peer = config.peer
        host, port = address
        link: WarmLink | None = None
        try:
            with trio.fail_after(peer.connect_timeout_s * 2):
                stream = await connect_stream(host, port, peer)
                link = WarmLink(
                    PeerChannel(
                        stream,
                        make_connection(
                            Role.SOURCE, peer, self._node, config.migration.max_batch_bytes, idle_link=True
                        ),
                        io_timeout_s=peer.connect_timeout_s,
                    )
                )
                await link.channel.handshake()
                if is_idle_link(link.channel):
                    secret = link.channel.conn.data_stream_secret()
                    link_id = f"w-{secrets.token_hex(8)}"
                    link.streams = await connect_streams(host, port, peer, secret, link_id, config.migration.streams)
            return link
        except BaseException:
            if link is not None:
                with trio.CancelScope(shield=True):
                    await _close(link)
            raise


def _socket_of(channel: PeerChannel) -> Any:
    stream: Any = channel.stream
    return getattr(stream, "transport_stream", stream).socket  # TLS: the socket beneath


def _quiet(sock: Any) -> bool:
    """Nothing to read and no hang-up on this socket, this instant."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI | select.POLLRDHUP)
    return not poller.poll(0)


def _close_streams(link: WarmLink) -> None:
    for sock in link.streams:
        sock.close()
    link.streams = []


async def _close(link: WarmLink) -> None:
    """At once, also while cancelled (the daemon stopping): no TLS close_notify to wait for."""
    _close_streams(link)
    await trio.aclose_forcefully(link.channel.stream)
    link.channel.conn.release_buffers()
