"""The target's count of idle links: authenticated connections from sources that keep them open,
with no migration yet, for their next migration to this host (peer.py IDLE_LINK).

Each holds an fd and a task here until its first message or its deadline
(peer.idle_link_timeout_s), and its warm data streams (at most transport.datastream.MAX_STREAMS,
`Target.attach_data_stream`), so they are bounded in total and per peer address
(peer.max_idle_links, peer.max_idle_links_per_peer): no one peer can hold this daemon's fds
(DESIGN 6). A link counts from the end of its handshake until its first message arrives; from
then on it is a migration, counted by `Incoming` like any other. Its warm streams find it by
their token for the link's whole life (`owner`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import trio

from transport import Event, RemoteProtocolError
from transport.datastream import DataHello

from ..config import Config
from ..peer import IDLE_LINK, LinkLost, PeerChannel

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


class IdleLinkRefused(Exception):
    """Taking this link would break a limit; the message names it and its key."""


class IdleLinks:
    def __init__(self) -> None:
        self._per_peer: Counter[str] = Counter()  # peer address (no port) -> idle links
        # The stream secret of each link that went idle -> its Target, for the link's whole life:
        # its warm data streams connect before its description names a migration, and find it
        # by their token, which only that link's two ends can make (transport/datastream.py).
        self._links: dict[bytes, Any] = {}

    def register(self, secret: bytes, target: Any) -> None:
        self._links[secret] = target

    def forget(self, target: Any) -> None:
        for secret in [s for s, t in self._links.items() if t is target]:
            del self._links[secret]

    def owner(self, hello: DataHello) -> Any:
        """The Target of the idle link this data stream's token proves it belongs to, or None.
        At most max_idle_links tokens to try (and links in a migration: max_incoming)."""
        for secret, target in self._links.items():
            try:
                hello.check_token(secret)
            except RemoteProtocolError:
                continue
            return target
        return None

    def __len__(self) -> int:
        return sum(self._per_peer.values())

    @contextmanager
    def holding(
        self, peer_host: str, max_total: int, max_per_peer: int, incoming: int, max_incoming: int
    ) -> Iterator[None]:
        """Count one idle link from `peer_host` while the block runs, or raise IdleLinkRefused.
        An idle link is a migration to come: with the `incoming` ones in progress they stay
        within migration.max_incoming (a description on it is then admitted as any, and an
        idle link never keeps a migration out). No await between the checks and the count: in
        trio the pair is atomic."""
        held = self._per_peer[peer_host]
        if held >= max_per_peer:
            raise IdleLinkRefused(
                f"{held} idle links from {peer_host} already, the most this daemon keeps from one peer "
                f"(peer.max_idle_links_per_peer = {max_per_peer})"
            )
        total = len(self)
        if total >= max_total:
            raise IdleLinkRefused(
                f"{total} idle links already, the most this daemon keeps (peer.max_idle_links = {max_total})"
            )
        if total + incoming >= max_incoming:
            raise IdleLinkRefused(
                f"{incoming} incoming migrations in progress and {total} idle links, as many as this daemon "
                f"accepts migrations (migration.max_incoming = {max_incoming})"
            )
        self._per_peer[peer_host] += 1
        try:
            yield
        finally:
            self._per_peer[peer_host] -= 1
            if not self._per_peer[peer_host]:
                del self._per_peer[peer_host]


class _IdleLinkTarget(Protocol):
    """What `wait_on_idle_link` needs of a Target (target.py)."""

    channel: PeerChannel
    peer: str  # HOST:PORT of the connection
    log: FilteringBoundLogger

    def restart_clocks(self) -> None: ...


def is_idle_link(channel: PeerChannel) -> bool:
    """The source announced this link as one it keeps idle (negotiated in the Hellos)."""
    negotiated = channel.conn.negotiated
    return negotiated is not None and IDLE_LINK in negotiated.capabilities


async def wait_on_idle_link(
    target: _IdleLinkTarget, idle_links: IdleLinks, config: Config, incoming: int
) -> Event | None:
    """An authenticated idle link's first message, counted against the idle-link limits while
    it waits; None when the link is refused over a limit, its deadline passed or the source
    closed it (the caller closes it: nothing was started for it).

    None of these sends an Abort: the source may be sending its description right now, and an
    Abort would fail that migration, where a closed link makes it connect afresh. A description
    that arrives after the deadline is never read, so no VM is made for it here."""
    channel, peer = target.channel, config.peer
    host = target.peer.rpartition(":")[0] or target.peer
    limits = (peer.max_idle_links, peer.max_idle_links_per_peer, incoming, config.migration.max_incoming)
    try:
        with idle_links.holding(host, *limits):
            idle_links.register(channel.conn.data_stream_secret(), target)
            target.log.info("idle_link_held", idle_links=len(idle_links), timeout_s=peer.idle_link_timeout_s)
            # Silence is what an idle link does: only its own deadline ends it.
            channel.io_timeout_s = math.inf
            first: Event | None = None
            waited = trio.current_time()
            with trio.move_on_after(peer.idle_link_timeout_s):
                first = await channel.receive()
            channel.io_timeout_s = peer.connect_timeout_s
    except IdleLinkRefused as err:
        target.log.warning("idle_link_refused", error=str(err))
        return None
    except LinkLost:
        target.log.info("idle_link_closed_by_source")
        return None
    if first is None:
        target.log.info("idle_link_expired", timeout_s=peer.idle_link_timeout_s)
        return None
    target.log.info("idle_link_used", idle_s=round(trio.current_time() - waited, 3))
    target.restart_clocks()
    return first
