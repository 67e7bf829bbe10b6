"""Warm peer links (the source side): after a migration to a peer, one fresh, fully
authenticated link to it is opened in the background and kept idle, so that the next migration
there sends its VM description at once, without the connect and the handshake on its setup
(what a host evacuation, dozens of VMs to one peer in a row, pays for every VM otherwise).

Rules of this file:

- A link is opened exactly as a migration's own (TCP, TLS or the PSK handshake with fresh
  nonces both ways, so fresh keys), announced as idle in its Hello (peer.py IDLE_LINK), and
  carries one migration: `take` hands it out once and forgets it; the migration closes it.
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

import select
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

Address = tuple[str, int]


@dataclass
class _IdleLink:
    channel: PeerChannel
    since: float = field(default_factory=time.monotonic)
    watch: trio.CancelScope = field(default_factory=trio.CancelScope)


class WarmLinks:
    def __init__(self, config: Callable[[], Config], node: str) -> None:
        self._config = config  # the daemon's current one (a reload may turn warm links off)
        self._node = node
        self._idle: dict[Address, _IdleLink] = {}
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
                    await _close(link.channel)
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

    async def take(self, host: str, port: int) -> PeerChannel | None:
        """The idle link to host:port, now the caller's (it closes it), if there is one that
        the peer has not closed; None otherwise."""
        link = self._idle.pop((host, port), None)
        if link is None:
            return None
        link.watch.cancel()  # no one else waits on its socket from here on
        if not self._config().peer.warm_links:
            await _close(link.channel)
            return None
        if not _quiet(link.channel) and not faults.active("source-warm-link-unwatched"):
            # An idle target sends nothing: EOF, a reset or bytes mean the link is over.
            self.log.info("warm_link_dead", peer=f"{host}:{port}", idle_s=round(time.monotonic() - link.since, 3))
            await _close(link.channel)
            return None
        return link.channel

    async def _open_and_watch(self, address: Address) -> None:
        peer = f"{address[0]}:{address[1]}"
        try:
            channel = await self._open(address)
        except (PeerError, OSError, trio.TooSlowError) as err:
            # Nothing lost: the next migration there connects as it always did.
            self.log.info("warm_link_failed", peer=peer, error=str(err) or type(err).__name__)
            return
        except Exception:  # a bug here must not end the pool's nursery, nor the daemon's
            self.log.exception("warm_link_crashed", peer=peer)
            return
        finally:
            self._opening.discard(address)
        if not is_idle_link(channel):
            # An older target cuts an idle link off at its connect_timeout_s: no use keeping it.
            self.log.info("warm_link_unsupported", peer=peer)
            await _close(channel)
            return
        if not self._config().peer.warm_links or address in self._idle:
            await _close(channel)
            return
        link = self._idle[address] = _IdleLink(channel)
        self.log.info("warm_link_ready", peer=peer)
        if faults.active("source-warm-link-unwatched"):
            return
        with link.watch:
            await trio.lowlevel.wait_readable(_socket_of(channel))
        if link.watch.cancelled_caught:
            return  # taken: the migration owns it now
        if self._idle.get(address) is link:
            del self._idle[address]
        self.log.info("warm_link_closed_by_peer", peer=peer, idle_s=round(time.monotonic() - link.since, 3))
        await _close(channel)

    async def _open(self, address: Address) -> PeerChannel:
        config = self._config()
        peer = config.peer
        host, port = address
        channel: PeerChannel | None = None
        try:
            with trio.fail_after(peer.connect_timeout_s):
                stream = await connect_stream(host, port, peer)
                channel = PeerChannel(
                    stream,
                    make_connection(Role.SOURCE, peer, self._node, config.migration.max_batch_bytes, idle_link=True),
                    io_timeout_s=peer.connect_timeout_s,
                )
                await channel.handshake()
            return channel
        except BaseException:
            if channel is not None:
                with trio.CancelScope(shield=True):
                    await _close(channel)
            raise


def _socket_of(channel: PeerChannel) -> Any:
    stream: Any = channel.stream
    return getattr(stream, "transport_stream", stream).socket  # TLS: the socket beneath


def _quiet(channel: PeerChannel) -> bool:
    """Nothing to read and no hang-up on the link's socket, this instant."""
    poller = select.poll()
    poller.register(_socket_of(channel).fileno(), select.POLLIN | select.POLLPRI | select.POLLRDHUP)
    return not poller.poll(0)


async def _close(channel: PeerChannel) -> None:
    """At once, also while cancelled (the daemon stopping): no TLS close_notify to wait for."""
    await trio.aclose_forcefully(channel.stream)
    channel.conn.release_buffers()
