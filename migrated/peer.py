"""The TCP edge of the migration protocol: bytes between a trio stream and a transport.Connection.

Everything protocol-shaped lives in `transport/`; this module only moves bytes. Page data is read
from the socket straight into the buffer of the event it belongs to (`get_receive_buffer`), and
written from guest RAM without a copy (`send_buffers` hands back the RAM view).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from transport import (
    NEED_DATA,
    Abort,
    Connection,
    ConnectionClosed,
    Event,
    Hello,
    ProtocolError,
    RemoteProtocolError,
    Role,
    State,
)

from .config import PeerConfig

E = TypeVar("E", bound=Event)
# How much one recv may read outside a page payload; payloads are read in one piece.
RECV_BYTES = 1 << 20
# An event whose buffers (a sealed record: length, ciphertext, tag) add up to at most this goes
# out in one write, joined: a copy this small costs less than a syscall and a checkpoint more.
_JOIN_BYTES = 64 << 10


class PeerError(Exception):
    """The peer or the link failed; the message says which and how."""


class PeerAborted(PeerError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"peer aborted: {reason}")
        self.reason = reason


class LinkLost(PeerError):
    """The connection broke or closed early: the peer's fate is unknown from here."""


# A migration with data streams may send its final pages on the control connection after every
# stream's end marker (migration/source.py `_downtime`); a target that does not offer this refuses
# a PageBatch on the control connection of such a migration.
FINAL_PAGES_ON_CONTROL = "final-pages-on-control"
# A source offers this in the Hello of a link it keeps idle for a later migration (a warm link,
# migration/warmlinks.py); a target always offers it. Negotiated, the target waits for that
# link's first message under peer.idle_link_timeout_s and counts it against its idle-link limits
# (migration/idlelinks.py) instead of cutting it off at connect_timeout_s. The Hellos are under
# the handshake's MAC (or inside TLS): the target decides this on an authenticated value.
IDLE_LINK = "idle-link"
# The target restores the machine state in its flat form (each x86 vCPU's registers as one block
# of bytes, migrated/kvm/arch/x86_64/flatstate.py), with less work inside the downtime; a source
# sends it only to a target that offers this, and the map form to any other.
FLAT_MACHINE_STATE = "flat-machine-state"


def make_connection(
    role: Role, peer: PeerConfig, node: str, max_batch_bytes: int, idle_link: bool = False
) -> Connection:
    """`idle_link`: a source's warm link (IDLE_LINK); a target offers it always."""
    offers_idle = role is Role.TARGET or idle_link
    return Connection(
        role,
        node=node,
        capabilities=(FINAL_PAGES_ON_CONTROL, FLAT_MACHINE_STATE, *((IDLE_LINK,) if offers_idle else ())),
        psk=peer.psk if peer.auth == "psk" else None,
        tls=peer.auth == "tls",
        allow_unauthenticated=peer.allow_unauthenticated,
        max_batch_bytes=max_batch_bytes,
        # The target applies every batch before it reads the next one (migration/target.py).
        reuse_page_buffer=role is Role.TARGET,
    )


# struct tcp_info (linux/tcp.h, since Linux 4.10): tcpi_min_rtt (microseconds, u32) at byte 148.
# Not tcpi_rtt: that smoothed figure follows the ACKs of data, which the receiving kernel may hold
# back, and read 1.7-4.6 ms on loopback here (min_rtt: 0.005-0.03 ms).
_TCPI_MIN_RTT_OFFSET = 148
_TCP_INFO_BYTES = 256


def _no_mark(name: str) -> None:
    pass


class PeerChannel:
    """One protocol conversation over one stream."""

    def __init__(self, stream: trio.abc.Stream, conn: Connection, io_timeout_s: float = 10.0) -> None:
        self.stream = stream
        self.conn = conn
        # A link that makes no progress for this long is broken: a cut cable sends no RST.
        self.io_timeout_s = io_timeout_s
        self.bytes_sent = 0
        self.rtt_ms = 0.0
        self._sends_under_way = 0  # send_all calls of this channel not yet returned

    @property
    def stream(self) -> trio.abc.Stream:
        return self._stream

    @stream.setter
    def stream(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        # recv_into needs the raw socket; a TLS stream decrypts into its own buffers instead.
        self._socket: Any = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def send(self, event: Event, at_once: bool = False) -> None:
        """`at_once`: written straight into the socket if it has room (`_write_at_once`)."""
        buffers = self.conn.send_buffers(event)
        if at_once or sum(memoryview(b).nbytes for b in buffers) <= _JOIN_BYTES:
            buffers = [b"".join(buffers)]
        await self._send_buffers(buffers, type(event).__name__, at_once)

    async def send_many(self, events: Sequence[Event], at_once: bool = False) -> None:
        """Small events in one write (one syscall, one checkpoint), in order: the cutover's
        state and DONE. Each event's buffers are copied before the next is encoded (a sealed
        record's buffer is reused by the next send). `at_once`: as for `send`."""
        data = b"".join([b"".join(self.conn.send_buffers(event)) for event in events])
        await self._send_buffers([data], ", ".join(type(event).__name__ for event in events), at_once)

    async def _send_buffers(self, buffers: Sequence[bytes | memoryview], what: str, at_once: bool = False) -> None:
        if at_once and len(buffers) == 1 and not self._sends_under_way:
            rest = self._write_at_once(buffers[0], what)
            if not rest.nbytes:
                return
            buffers = [rest]
        self._sends_under_way += 1
        try:
            for buffer in buffers:
                with trio.fail_after(self.io_timeout_s):
                    await self.stream.send_all(buffer)
                self.bytes_sent += memoryview(buffer).nbytes
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            raise LinkLost(f"sending {what} failed: {err}") from err
        except trio.TooSlowError:
            raise LinkLost(f"sending {what} made no progress for {self.io_timeout_s} s") from None
        finally:
            self._sends_under_way -= 1

    def _write_at_once(self, buffer: bytes | memoryview, what: str) -> memoryview:
        """One write(2) into the (non-blocking) socket, without trio's send_all: that takes two
        passes through the scheduler, whatever else is runnable runs in them, and a downtime
        message waited there 0.1-0.2 ms each on a busy host (bench/timeline.py: the gap before
        `loaded_sent`, `commit_sent`, `running_sent`). Only while no other send of this channel
        is under way, so bytes never interleave; returns what did not fit, for send_all."""
        view = memoryview(buffer).cast("B")
        if self._socket is None:
            return view  # TLS: the record layer is trio's
        try:
            written = os.write(self._socket.fileno(), view)
        except BlockingIOError:
            return view
        except OSError as err:
            raise LinkLost(f"sending {what} failed: {err}") from err
        self.bytes_sent += written
        return view[written:]

    async def receive(self) -> Event:
        """The next event; PeerAborted for an Abort, LinkLost for EOF or a broken link."""
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as err:
                raise PeerError(f"peer broke the protocol: {err}") from err
            if event is NEED_DATA:
                await self._fill()
                continue
            if isinstance(event, ConnectionClosed):
                raise LinkLost("the peer closed the connection")
            if isinstance(event, Abort):
                raise PeerAborted(event.reason)
            assert isinstance(event, Event)
            return event

    async def expect(self, kind: type[E]) -> E:
        event = await self.receive()
        if not isinstance(event, kind):
            raise PeerError(f"expected {kind.__name__} from the peer, got {type(event).__name__}")
        return event

    async def _fill(self) -> None:
        try:
            with trio.fail_after(self.io_timeout_s):
                await self._fill_once()
        except trio.TooSlowError:
            raise LinkLost(f"nothing received from the peer for {self.io_timeout_s} s") from None

    async def _fill_once(self) -> None:
        try:
            if self._socket is not None:
                buffer = self.conn.get_receive_buffer(RECV_BYTES)
                self.conn.receive_buffer_updated(await self._socket.recv_into(buffer))
            else:
                self.conn.receive_data(await self.stream.receive_some(RECV_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            raise LinkLost(f"receiving failed: {err}") from err

    async def handshake(self, then: Event | None = None, mark: Callable[[str], None] = _no_mark) -> None:
        """Hello both ways (source first), then the PSK MACs when negotiated (DESIGN 6).

        `then` (the source's VmDescription): sent right behind the source's Auth, in the same
        write, which saves the setup a round trip (transport/states.py rule 4); it is out
        when this returns, and the target's Auth checked. `mark`: called with each step's name
        as it ends (the setup's timeline)."""
        started = time.perf_counter()
        if self.conn.role is Role.SOURCE:
            await self.send(self.conn.make_hello())
            mark("hello_sent")
            await self.expect(Hello)
            mark("hello_received")
            self.rtt_ms = (time.perf_counter() - started) * 1e3
        else:
            await self.expect(Hello)
            mark("hello_received")
            await self.send(self.conn.make_hello())
            mark("hello_sent")
        if self.conn.state in (State.AUTH_SOURCE, State.AUTH_TARGET):
            if self.conn.role is Role.SOURCE:
                auth_started = time.perf_counter()
                if then is None:
                    await self.send(self.conn.make_auth())
                else:
                    await self.send_many([self.conn.make_auth(), then])
                mark("auth_sent")
                try:
                    await self.receive()
                except LinkLost:
                    # The target may not answer a wrong MAC (no Abort exists before
                    # authentication): it closes the link, and that is all we learn.
                    raise PeerError(
                        "the peer closed the link after our authentication: authentication "
                        "failed (do both daemons use the same pre-shared key?)"
                    ) from None
                # A second round trip, the lower counts: the Hello's includes the target taking
                # up the new connection (2-24 ms measured here on a busy host, against 0.2-1 ms
                # for a cutover's), and a first migration's prediction prices two of them.
                self.rtt_ms = min(self.rtt_ms, (time.perf_counter() - auth_started) * 1e3)
                mark("auth_received")
            else:
                await self.receive()
                mark("auth_received")
                await self.send(self.conn.make_auth())
                mark("auth_sent")
        elif then is not None:
            await self.send(then)  # tls or none: nothing to prove here, the description follows
        expected = State.READY if then is None else State.DESCRIBED
        if self.conn.state is not expected or not self.conn.authenticated:
            raise PeerError(f"handshake ended in state {self.conn.state.name}, not {expected.name}")

    def link_rtt_ms(self) -> float | None:
        """The link's own round trip as the kernel measured it: the least of its samples
        (TCP_INFO's tcpi_min_rtt), the connection's SYN and SYN-ACK among them, which the peer's
        kernel answers without its process, so neither side's scheduling is in it, as it is in
        `rtt_ms`. None where the stream is no TCP socket or the kernel has no figure."""
        sock = self._socket
        if sock is None:
            sock = getattr(getattr(self.stream, "transport_stream", None), "socket", None)  # TLS
        if sock is None:
            return None
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
        except (OSError, AttributeError):
            return None
        if len(info) < _TCPI_MIN_RTT_OFFSET + 4:
            return None
        rtt_us = int.from_bytes(info[_TCPI_MIN_RTT_OFFSET : _TCPI_MIN_RTT_OFFSET + 4], sys.byteorder)
        return rtt_us / 1e3 if rtt_us else None

    async def abort(self, reason: str) -> None:
        """Tell the peer, if the protocol and the link still allow it; never raises."""
        try:
            await self.send(Abort.from_text(reason))
        except (PeerError, ProtocolError):
            pass

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            await self.stream.aclose()
        self.conn.release_buffers()
