"""One side of one migration's connection: bytes in, events out; events in, bytes out.

No sockets here. The edge feeds what it reads to `receive_data` (b"" for EOF) and drains
`next_event` until it returns NEED_DATA; it writes what `send` (or `send_buffers`) returns.
State changes come only from states.py; this module adds the checks that need the conversation's
memory: the handshake (versions, auth, MACs), the VM's memory layout for every PageBatch, the
page count in Done, the digest in Loaded, the migration id in QueryResult.

With a pre-shared key, each side seals every frame it sends after its own Auth and opens every
frame it receives after the peer's Auth (seal.py): from READY on, no byte of either direction is
taken unauthenticated, so Done's verify and digest and the cutover messages are the peer's own.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from . import auth, datastream, framing, limits, seal
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    Abort,
    Accept,
    Auth,
    AuthMode,
    ConnectionClosed,
    Done,
    Event,
    Hello,
    Loaded,
    NeedData,
    NEED_DATA,
    PageBatch,
    Query,
    QueryResult,
    VmDescription,
)
from .states import (
    PEER_CLOSED,
    Role,
    State,
    eof_is_clean,
    explain,
    in_flight_after_abort,
    next_state,
)

_PLACEHOLDER_NONCE: Final = bytes(limits.NONCE_BYTES)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What both HELLOs agreed on: both sides compute the same values."""

    version: int
    auth: AuthMode
    capabilities: frozenset[str]
    max_batch_bytes: int
    peer_node: str


class _Disposition(enum.Enum):
    DELIVER = "deliver"  # allowed by the table: apply it and hand it out
    DROP = "drop"  # sent by the peer before it saw our Abort: check it, then drop it
    CROSSING = "crossing"  # the peer's Abort crossed ours: hand it out, state unchanged


@dataclass(slots=True)
class _Frame:
    """A frame whose header was read and accepted; its payload is arriving."""

    wire: framing.Wire
    fields: dict[str, Any]
    header: bytes
    payload: bytearray | memoryview | None
    filled: int = 0

    @property
    def missing(self) -> int:
        return 0 if self.payload is None else len(self.payload) - self.filled


class Connection:
    """The protocol state machine for one side (SOURCE or TARGET) of one connection.

    Authentication (DESIGN section 6): give `psk` (HMAC handshake), or `tls=True` when the edge
    already did mutual TLS, or `allow_unauthenticated=True` to talk to peers that are
    unauthenticated too. Both sides must be configured alike, or the handshake fails.
    """

    def __init__(
        self,
        role: Role,
        *,
        node: str,
        psk: bytes | None = None,
        tls: bool = False,
        allow_unauthenticated: bool = False,
        capabilities: Iterable[str] = (),
        max_batch_bytes: int = limits.DEFAULT_MAX_BATCH_BYTES,
        versions: tuple[int, int] = (limits.PROTOCOL_VERSION_MIN, limits.PROTOCOL_VERSION_MAX),
        reuse_page_buffer: bool = False,
    ) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be a Role, got {role!r}")
        self.role: Final = role
        self.peer: Final = role.peer
        self._psk = auth.check_key(psk) if psk is not None else None
        if tls and psk is not None:
            raise LocalProtocolError("give psk or tls=True, not both")
        mode: AuthMode = "tls" if tls else "psk" if psk is not None else "none"
        if mode == "none" and not allow_unauthenticated:
            raise LocalProtocolError(
                "no way to authenticate the peer: give psk, or tls=True after mutual TLS, or "
                "allow_unauthenticated=True if the operator disabled authentication"
            )
        low, high = versions
        if not limits.PROTOCOL_VERSION_MIN <= low <= high <= limits.PROTOCOL_VERSION_MAX:
            raise LocalProtocolError(
                f"versions {low}..{high} are not within what this implementation speaks: "
                f"{limits.PROTOCOL_VERSION_MIN}..{limits.PROTOCOL_VERSION_MAX}"
            )
        # Validates node, capabilities and max_batch_bytes now rather than at make_hello().
        self._hello_template: Final = Hello(
            version_min=low,
            version_max=high,
            node=node,
            nonce=_PLACEHOLDER_NONCE,
            auth=mode,
            capabilities=frozenset(capabilities) | {framing.OPTIONAL_FIELDS},
            max_batch_bytes=max_batch_bytes,
        )

        self.state: State = State.START
        self.negotiated: Negotiated | None = None
        self.authenticated = False
        """True from READY on: the peer proved the psk, or the edge's mutual TLS vouched for it,
        or both operators allowed unauthenticated peers."""
        self.description: VmDescription | None = None
        self.layout: Mapping[int, int] | None = None
        """slot -> pages, fixed by the Accept of `description`; every PageBatch is checked."""
        self.pages_transferred = 0
        self.bytes_received = 0
        """Bytes the peer sent, as they arrived (sealed records included): with the sender's
        count of bytes written, both sides' statistics describe the same bytes."""
        """Page entries (data and zero) of every PageBatch so far: what Done.pages_total says."""
        self.aborted: Abort | None = None
        self.aborted_by: Role | None = None
        self.dropped_after_abort = 0
        """Peer events that crossed our Abort and were checked, then dropped (rule 6)."""

        self._hellos: dict[Role, tuple[Hello, bytes]] = {}
        self._stream_secret: bytes | None = None  # `data_stream_secret`, once derived
        self._done: Done | None = None
        self._query: Query | None = None
        self._since_peer: list[State] = [State.START]
        self._in_flight: frozenset[type[Event]] | None = None
        self._error: str | None = None

        # Receive side: bytes not yet parsed are _buf[_pos:]; a frame whose header was read
        # collects its payload in its own buffer, which the event then owns (never a view of
        # _buf, so _buf can be compacted while events live on).
        self._buf = bytearray()
        self._pos = 0
        self._frame: _Frame | None = None
        self._eof = False
        self._closed: ConnectionClosed | None = None
        self._scratch = bytearray(limits.SCRATCH_BYTES)
        self._lent: str | None = None
        # With reuse_page_buffer, every PageBatch payload lands in one buffer of the negotiated
        # batch size, so a PageBatch's data and indices are valid only until the next call to
        # next_event(). The edge that applies each batch at once then gets warm memory for every
        # batch instead of a fresh allocation (and its page faults) per batch.
        self._reuse_page_buffer = reuse_page_buffer
        self._page_buffer: bytearray | None = None
        # psk: the records this side seals (after its own Auth) and opens (after the peer's).
        self._sealer: seal.Sealer | None = None
        self._opener: seal.Opener | None = None

    # --- public: handshake helpers --------------------------------------------------------------

    def make_hello(self, nonce: bytes | None = None) -> Hello:
        """This side's Hello, from the configuration, with a fresh nonce (or the one given)."""
        return replace(self._hello_template, nonce=auth.new_nonce() if nonce is None else nonce)

    def make_auth(self) -> Auth:
        """This side's Auth: the HMAC of the handshake transcript under the pre-shared key."""
        if self._psk is None or self.negotiated is None or len(self._hellos) != 2:
            raise LocalProtocolError("make_auth needs a psk and both Hellos exchanged")
        return Auth(auth.compute_mac(self._psk, self._transcript(), self.role))

    @property
    def sealer(self) -> seal.Sealer | None:
        """What seals this side's frames once its Auth is out (psk only), else None. Its
        sequence is the connection's own: a frame sealed through it takes the next slot in the
        stream (tests use it to send frames built by hand that `send` would refuse)."""
        return self._sealer

    def data_stream_secret(self) -> bytes:
        """The secret this session's data streams derive their tokens and keys from
        (datastream.py): only the two ends of this authenticated session can compute it."""
        if self.state is State.ERROR or not self.authenticated or len(self._hellos) != 2:
            raise LocalProtocolError("data streams need an authenticated session (both Hellos, READY)")
        if self._stream_secret is None:
            # Derived once: both Hellos are final from here on, and each derivation is a cold
            # HKDF call in a migration's setup (~0.1 ms there, 5 us warm).
            transcript = self._transcript()
            self._stream_secret = datastream.stream_secret(self._psk, transcript.source_nonce, transcript.target_nonce)
        return self._stream_secret

    @property
    def sealed(self) -> bool:
        """True once frames in both directions travel sealed."""
        return self._sealer is not None and self._opener is not None

    # --- public: sending ------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes of `event` for the peer; the state moves on. See send_buffers."""
        return b"".join(self.send_buffers(event))

    def send_buffers(self, event: Event) -> list[bytes | memoryview]:
        """`send` without joining: [prefix + header, payload buffers...] for sendmsg.

        In the clear, a PageBatch's `data` is returned as a view of the buffer it came in, not a
        copy: the edge must not change it until written. Sealed (psk, after this side's Auth),
        the buffers are the record: its length, the ciphertext and the tag, the ciphertext in a
        buffer reused by the next send, so write them before sending again. Raises
        LocalProtocolError, with nothing sent and the state unchanged, when the event is not
        allowed now.
        """
        if self.state is State.ERROR:
            raise LocalProtocolError(f"connection is in ERROR ({self._error}): close it")
        if type(event) not in framing.BY_EVENT:
            if isinstance(event, ConnectionClosed):
                raise LocalProtocolError("ConnectionClosed is not sent: close the socket instead")
            raise LocalProtocolError(f"{type(event).__name__} is not a protocol message")
        if self._next(self.role, type(event)) is None:
            raise LocalProtocolError(explain(self.state, self.role, type(event)))
        self._check(event, self.role)
        optional = self.negotiated is not None and framing.OPTIONAL_FIELDS in self.negotiated.capabilities
        header, buffers = framing.encode(event, optional_fields=optional)
        sealer = self._sealer  # the sealer that our own Auth creates seals what follows it
        if sealer is not None:
            buffers = sealer.seal(buffers)
        self._apply(event, self.role, header)
        return buffers

    # --- public: receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes the peer sent, as read; b"" means EOF (the peer will send nothing more)."""
        if self._lent is not None:
            raise LocalProtocolError("call receive_buffer_updated() for the buffer you got first")
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if self.state is State.ERROR:
            return  # nothing more is parsed; next_event raises
        view = memoryview(data).cast("B")
        if not view.nbytes:
            self._eof = True
            return
        self.bytes_received += view.nbytes
        if self._opener is not None:
            self._check_buffered(self._opener.buffered + view.nbytes)
            self._opener.feed(view)
            return
        frame = self._frame
        if frame is not None and frame.missing and frame.payload is not None:
            take = min(view.nbytes, frame.missing)
            frame.payload[frame.filled : frame.filled + take] = view[:take]
            frame.filled += take
            view = view[take:]
        if view.nbytes:
            self._check_buffered(len(self._buf) - self._pos + view.nbytes)
            self._compact()
            self._buf += view

    @staticmethod
    def _check_buffered(buffered: int) -> None:
        if buffered > limits.RECEIVE_BUFFER_LIMIT:
            raise LocalProtocolError(
                f"receive buffer would hold {buffered} bytes, more than "
                f"{limits.RECEIVE_BUFFER_LIMIT}: drain next_event() until NEED_DATA "
                "before feeding more"
            )

    def release_buffers(self) -> None:
        """Drop the receive buffers (up to the negotiated batch size) of a connection whose
        stream is closed; its state stays readable. A finished migration is kept for the
        in-doubt query, and must not keep megabytes per migration alive with it."""
        self._buf = bytearray()
        self._pos = 0
        self._frame = None
        self._page_buffer = None
        self._scratch = bytearray(1)
        if self._sealer is not None:
            self._sealer.release()
        if self._opener is not None:
            self._opener.release()

    def get_receive_buffer(self, size_hint: int = limits.SCRATCH_BYTES) -> memoryview:
        """Where the edge may read the next bytes to (sock.recv_into), then call
        receive_buffer_updated(n). Inside a payload, this is the payload's own buffer: page data
        goes from the socket into the event's buffer with no copy in between."""
        if self._eof:
            raise LocalProtocolError("get_receive_buffer after EOF")
        if self._opener is not None and self._opener.missing:
            self._lent = "record"
            return self._opener.receive_buffer()
        frame = self._frame
        if frame is not None and frame.missing and frame.payload is not None:
            self._lent = "payload"
            return memoryview(frame.payload)[frame.filled :]
        self._lent = "scratch"
        size = max(1, min(size_hint, len(self._scratch)))
        return memoryview(self._scratch)[:size]

    def receive_buffer_updated(self, nbytes: int) -> None:
        """nbytes were written to the buffer from get_receive_buffer; 0 means EOF."""
        lent, self._lent = self._lent, None
        if lent is None:
            raise LocalProtocolError("receive_buffer_updated without get_receive_buffer")
        if nbytes == 0:
            self._eof = True
        elif lent == "record" and self._opener is not None:
            self._opener.received(nbytes)
            self.bytes_received += nbytes
        elif lent == "payload" and self._frame is not None:
            if not 0 < nbytes <= self._frame.missing:
                raise LocalProtocolError(f"nbytes {nbytes} exceeds the buffer handed out")
            self._frame.filled += nbytes
            self.bytes_received += nbytes
        else:
            if not 0 < nbytes <= len(self._scratch):
                raise LocalProtocolError(f"nbytes {nbytes} exceeds the buffer handed out")
            self.receive_data(memoryview(self._scratch)[:nbytes])

    def next_event(self) -> Event | NeedData:
        """The next event from the peer, NEED_DATA, or ConnectionClosed after EOF.

        Raises RemoteProtocolError for anything wrong in the peer's bytes; the connection is
        then in ERROR for good and every later call raises again.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError(f"connection failed earlier: {self._error}")
        try:
            while True:
                event = self._receive_one()
                if event is not None:
                    return event
        except ProtocolError as exc:
            self.state = State.ERROR
            self._error = str(exc)
            raise RemoteProtocolError(str(exc)) from exc

    # --- receiving: frames ----------------------------------------------------------------------

    def _receive_one(self) -> Event | NeedData | None:
        """One step: an event, NEED_DATA, or None when a frame was dropped (rule 6)."""
        if self._opener is not None:
            return self._receive_sealed(self._opener)
        if self._frame is None:
            available = len(self._buf) - self._pos
            if available < framing.PREFIX.size:
                return self._need_data()
            header_len, payload_len = framing.PREFIX.unpack_from(self._buf, self._pos)
            framing.check_prefix(header_len, payload_len)
            if available < framing.PREFIX.size + header_len:
                return self._need_data()
            start = self._pos + framing.PREFIX.size
            header = bytes(self._buf[start : start + header_len])
            self._consume(framing.PREFIX.size + header_len)
            wire, fields = framing.decode_header(header)
            self._disposition(wire.event)  # refuse before buffering the payload
            self._check_payload_len(wire, fields, payload_len)
            frame = _Frame(wire, fields, header, self._payload_buffer(wire, payload_len))
            if frame.payload is not None:
                take = min(payload_len, len(self._buf) - self._pos)
                with memoryview(self._buf) as view:
                    frame.payload[:take] = view[self._pos : self._pos + take]
                self._consume(take)
                frame.filled = take
            self._frame = frame
        frame = self._frame
        if frame.missing:
            return self._need_data()
        self._frame = None
        return self._deliver(frame)

    def _receive_sealed(self, opener: seal.Opener) -> Event | NeedData | None:
        """One record, opened and authenticated, holding exactly one frame (seal.py)."""
        plain = opener.next_frame()
        if plain is None:
            return self._need_data()
        header, payload = framing.split_frame(plain)
        wire, fields = framing.decode_header(header)
        self._disposition(wire.event)
        self._check_payload_len(wire, fields, payload.nbytes)
        body = payload if payload.nbytes else None
        return self._deliver(_Frame(wire, fields, header, body, filled=payload.nbytes))

    def _deliver(self, frame: _Frame) -> Event | None:
        """The event of a complete frame, checked and applied; None when dropped (rule 6)."""
        event = framing.build_event(frame.wire, frame.fields, frame.payload)
        disposition = self._disposition(type(event))  # again: we may have sent Abort meanwhile
        self._check(event, self.peer)
        if disposition is _Disposition.DROP:
            self._record(event, self.peer, frame.header)  # counts stay true to the stream
            self.dropped_after_abort += 1
            return None
        if disposition is _Disposition.CROSSING:
            self._in_flight = frozenset()  # the peer aborted too: it sends nothing but Close
            return event
        self._apply(event, self.peer, frame.header)
        return event

    def _need_data(self) -> NeedData | ConnectionClosed:
        if not self._eof:
            return NEED_DATA
        if self._opener is not None and self._opener.buffered:
            raise LocalProtocolError(
                f"connection closed mid-record ({self._opener.buffered} bytes of an unfinished sealed record)"
            )
        pending = len(self._buf) - self._pos
        if self._frame is not None or pending:
            frame = self._frame
            have = pending if frame is None else (framing.PREFIX.size + len(frame.header) + frame.filled)
            raise LocalProtocolError(f"connection closed mid-frame ({have} bytes of an unfinished frame)")
        if self._closed is None:
            self._closed = ConnectionClosed(clean=eof_is_clean(self.state, self.peer))
        return self._closed

    def _consume(self, count: int) -> None:
        self._pos += count
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0

    def _compact(self) -> None:
        # Drop consumed bytes once they are most of the buffer: amortized O(1) per byte.
        if self._pos >= limits.SCRATCH_BYTES and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _disposition(self, event_type: type[Event]) -> _Disposition:
        if self._next(self.peer, event_type) is not None:
            return _Disposition.DELIVER
        peer_closed = self.state in (PEER_CLOSED[self.peer], State.CLOSED)
        if self._in_flight is not None and event_type in self._in_flight and not peer_closed:
            return _Disposition.CROSSING if event_type is Abort else _Disposition.DROP
        raise LocalProtocolError(f"from the {self.peer.value}: {explain(self.state, self.peer, event_type)}")

    def _payload_buffer(self, wire: framing.Wire, length: int) -> bytearray | memoryview | None:
        if not length:
            return None
        if not (self._reuse_page_buffer and wire.payload == "pages"):
            return bytearray(length)
        if self._page_buffer is None or len(self._page_buffer) < length:
            # Bounded: _check_batch_len already held length to the negotiated max batch.
            self._page_buffer = bytearray(
                length if self.negotiated is None else max(length, self.negotiated.max_batch_bytes)
            )
        return memoryview(self._page_buffer)[:length]

    def _check_payload_len(self, wire: framing.Wire, fields: dict[str, Any], length: int) -> None:
        """Per-type payload bounds, from the header alone (before the payload is buffered)."""
        if wire.payload == "none" and length:
            raise LocalProtocolError(f"frame payload length {length} for {wire.name!r}, which carries no payload")
        if wire.payload == "blob" and length > limits.MAX_DEVICE_STATE_BYTES:
            raise LocalProtocolError(f"DeviceState payload length {length} exceeds {limits.MAX_DEVICE_STATE_BYTES}")
        if wire.payload == "pages":
            n_pages, n_zero = fields["n_pages"], fields["n_zero"]
            framing.check_page_counts(n_pages, n_zero)
            page_size = self._slot_pages(fields["slot"])[1]
            want = framing.page_payload_len(n_pages, n_zero, page_size)
            if length != want:
                raise LocalProtocolError(
                    f"PageBatch payload length {length} does not match {n_pages} pages + "
                    f"{n_zero} zero pages of {page_size} bytes (expected {want})"
                )
            self._check_batch_len(length)

    # --- the conversation -----------------------------------------------------------------------

    def _next(self, sender: Role, event_type: type[Event]) -> State | None:
        psk = self.negotiated is not None and self.negotiated.auth == "psk"
        return next_state(self.state, sender, event_type, psk=psk)

    def _check(self, event: Event, sender: Role) -> None:
        """Checks that need the conversation; LocalProtocolError on failure."""
        ours = sender is self.role
        if isinstance(event, Hello):
            if ours and event != replace(self._hello_template, nonce=event.nonce):
                raise LocalProtocolError("Hello does not match this Connection's configuration: use make_hello()")
            if not ours:
                self._negotiate(event)
        elif isinstance(event, Auth):
            if self._psk is None:
                raise LocalProtocolError("Auth without a psk")
            if not auth.verify_mac(self._psk, self._transcript(), sender, event.mac):
                if ours:
                    raise LocalProtocolError("Auth.mac is not this side's MAC: use make_auth()")
                raise LocalProtocolError("peer failed authentication")
        elif isinstance(event, PageBatch):
            self._check_batch(event)
        elif isinstance(event, Done):
            if event.pages_total != self.pages_transferred:
                raise LocalProtocolError(
                    f"Done.pages_total {event.pages_total} but this connection carried "
                    f"{self.pages_transferred} page entries"
                )
        elif isinstance(event, Loaded):
            done = self._done
            if done is not None and done.verify == "full" and event.digest != done.digest:
                raise LocalProtocolError(
                    "Loaded.digest does not match Done.digest: a target whose copy differs must Abort"
                )
        elif isinstance(event, QueryResult):
            asked = self._query.migration_id if self._query is not None else None
            if event.migration_id != asked:
                raise LocalProtocolError(
                    f"QueryResult.migration_id {event.migration_id!r} does not answer Query {asked!r}"
                )

    def _slot_pages(self, slot: int) -> tuple[int, int]:
        """(pages in slot, page size); the layout is fixed once the VM was accepted."""
        if self.layout is None or self.description is None:
            raise LocalProtocolError("page data before Accept")
        if slot not in self.layout:
            raise LocalProtocolError(f"unknown slot {slot} (the VM has slots {sorted(self.layout)})")
        return self.layout[slot], self.description.page_size

    def _check_batch_len(self, length: int) -> None:
        bound = self.negotiated.max_batch_bytes if self.negotiated else 0
        if length > bound:
            raise LocalProtocolError(f"PageBatch payload length {length} exceeds the negotiated max batch {bound}")

    def _check_batch(self, batch: PageBatch) -> None:
        """DESIGN section 4: a peer can never write outside guest RAM."""
        slot_pages, page_size = self._slot_pages(batch.slot)
        if batch.data_bytes != batch.pages.size * page_size:
            raise LocalProtocolError(
                f"PageBatch.data is {batch.data_bytes} bytes; {batch.pages.size} pages of "
                f"{page_size} bytes need {batch.pages.size * page_size}"
            )
        for name, indices in (("page", batch.pages), ("zero page", batch.zero_pages)):
            if indices.size:
                highest = int(indices.max())
                if highest >= slot_pages:
                    raise LocalProtocolError(f"{name} index {highest} outside slot {batch.slot} ({slot_pages} pages)")
        self._check_batch_len(framing.INDEX_BYTES * (batch.pages.size + batch.zero_pages.size) + batch.data_bytes)

    def _negotiate(self, theirs: Hello) -> Negotiated:
        ours = self._hello_template
        low = max(ours.version_min, theirs.version_min)
        high = min(ours.version_max, theirs.version_max)
        if low > high:
            raise LocalProtocolError(
                f"no common protocol version: peer speaks {theirs.version_min}.."
                f"{theirs.version_max}, this side {ours.version_min}..{ours.version_max} (version 2 "
                "seals every frame after a psk handshake; run the same release on both hosts)"
            )
        if theirs.auth != ours.auth:
            raise LocalProtocolError(
                f"auth mismatch: peer offers {theirs.auth!r}, this side is configured for {ours.auth!r}"
            )
        mine = self._hellos.get(self.role)
        if mine is not None and mine[0].nonce == theirs.nonce:
            raise LocalProtocolError("peer echoed this side's nonce")
        return Negotiated(
            version=high,
            auth=ours.auth,
            capabilities=ours.capabilities & theirs.capabilities,
            max_batch_bytes=min(ours.max_batch_bytes, theirs.max_batch_bytes),
            peer_node=theirs.node,
        )

    def _transcript(self) -> auth.Transcript:
        (source, source_header), (target, target_header) = (self._hellos[Role.SOURCE], self._hellos[Role.TARGET])
        return auth.Transcript(source.nonce, target.nonce, source_header, target_header)

    def _apply(self, event: Event, sender: Role, header: bytes) -> None:
        """Record what the event changes, then move to the state the table names."""
        self._record(event, sender, header)
        following = self._next(sender, type(event))
        assert following is not None, "checked before"
        self.state = following
        if following is State.READY or (isinstance(event, Auth) and following is State.DESCRIBED):
            self.authenticated = True  # both Auths checked (the second may follow the description)
        if sender is self.peer:
            self._since_peer = [following]
        else:
            self._since_peer.append(following)

    def _record(self, event: Event, sender: Role, header: bytes) -> None:
        """What the conversation remembers of an event, apart from the state."""
        if isinstance(event, Hello):
            self._hellos[sender] = (event, header)
            if sender is self.peer:
                self.negotiated = self._negotiate(event)
        elif isinstance(event, VmDescription):
            self.description = event
        elif isinstance(event, Accept) and self.description is not None:
            self.layout = self.description.slot_pages()
        elif isinstance(event, PageBatch):
            self.pages_transferred += int(event.pages.size + event.zero_pages.size)
        elif isinstance(event, Done):
            self._done = event
        elif isinstance(event, Auth):
            self._start_sealing(sender)
        elif isinstance(event, Query):
            self._query = event
        elif isinstance(event, Abort):
            self.aborted, self.aborted_by = event, sender
            if sender is self.role:
                self._in_flight = in_flight_after_abort(self._since_peer, self.peer)

    def _start_sealing(self, sender: Role) -> None:
        """Frames `sender` sends after this Auth are sealed under the key for its direction."""
        assert self._psk is not None and self.negotiated is not None, "Auth exists only with a psk"
        transcript = self._transcript()
        key = seal.derive_key(self._psk, transcript.source_nonce, transcript.target_nonce, sender)
        if sender is self.role:
            self._sealer = seal.Sealer(key)
            return
        # The largest frame the peer may send from now on: a header and a full batch or state blob.
        largest = max(self.negotiated.max_batch_bytes, limits.MAX_DEVICE_STATE_BYTES)
        self._opener = seal.Opener(
            key, framing.PREFIX.size + limits.MAX_HEADER_BYTES + largest, reuse=self._reuse_page_buffer
        )
        # Whatever arrived behind the peer's Auth is already its first records.
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        if rest:
            self._opener.feed(memoryview(rest))
