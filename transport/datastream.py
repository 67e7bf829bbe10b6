"""Data streams: page batches on extra connections of one migration, sans-IO (DESIGN 2 and 6).

After the control connection's handshake the source may open `count` data connections to the
same peer port. Each carries, one way (source -> target), page batches and then one end marker.

    magic (8 bytes, in the clear; then the TLS handshake when auth is "tls")
    hello: u16 BE id_len | migration id | u16 BE index | u16 BE count | 32-byte token
    frames as on the control connection (framing.py), sealed per record (seal.py) with psk

Rules of this file:

1. A data stream belongs to the control session that made its secret: the secret is derived
   from the pre-shared key (or nothing, with tls and none) and both Hello nonces of that session
   (`stream_secret`), which only its two ends know (with tls the nonces travelled inside TLS).
   The token is an HMAC of the stream's index, count and migration id under that secret: the
   migration id finds the session, the token proves the stream came from its source.
2. With psk every stream has its own key, derived from the secret and the index, and its own
   record sequence from 0: a changed, dropped, reordered, replayed or injected record on any
   stream fails its tag (seal.py), and a record moved to another stream fails under that key.
3. Only PageBatch and StreamEnd travel on a data stream. Every batch is checked against the VM's
   memory layout and the negotiated batch size before the caller sees it.
4. StreamEnd is last: its counts must match what the stream carried, nothing may follow it, and
   EOF before it is an error. A page always travels on the same stream (the source's rule), so
   TCP's order orders its versions; the target loads once every stream's end marker arrived.
5. The receiver never reads past the frame (or record) it is in: it asks for exact byte counts.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import framing, limits, seal
from .errors import LocalProtocolError, RemoteProtocolError
from .events import NEED_DATA, Event, NeedData, PageBatch, _int_field

MAGIC: Final = b"MGDATA\x00\x01"
"""First bytes of a data connection. A control connection starts with a frame prefix, whose first
byte is 0 (a header is under 64 KiB), a TLS connection with 0x16: one peeked byte tells them apart."""

MAX_STREAMS: Final = 16
"""More streams than cores buys nothing; 16 bounds the threads and sockets one migration holds."""

SECRET_BYTES: Final = 32
TOKEN_BYTES: Final = 32
_U16: Final = struct.Struct(">H")
_HELLO_TAIL: Final = struct.Struct(">HH")
_LABEL: Final = b"migrated-data-v1 "


def stream_secret(psk: bytes | None, source_nonce: bytes, target_nonce: bytes) -> bytes:
    """The session's data-stream secret (rule 1)."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=source_nonce + target_nonce, info=_LABEL + b"secret"
    )
    return hkdf.derive(psk if psk is not None else bytes(SECRET_BYTES))


def stream_key(secret: bytes, index: int) -> bytes:
    """The AEAD key of stream `index` (rule 2); data flows source -> target only."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=seal.KEY_BYTES,
        salt=None,
        info=_LABEL + f"key {index} source->target".encode(),
    )
    return hkdf.derive(secret)


def stream_token(secret: bytes, migration_id: str, index: int, count: int) -> bytes:
    message = _LABEL + b"token" + _HELLO_TAIL.pack(index, count) + migration_id.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class DataHello:
    """What a data connection says it is; `check_token` proves it."""

    migration_id: str
    index: int
    count: int
    token: bytes

    def __post_init__(self) -> None:
        if not self.migration_id or len(self.migration_id) > limits.MAX_NAME_CHARS:
            raise LocalProtocolError(f"data stream migration id of {len(self.migration_id)} characters")
        if not self.migration_id.isprintable():
            raise LocalProtocolError(f"data stream migration id holds control characters: {self.migration_id[:80]!r}")
        if not 1 <= self.count <= MAX_STREAMS:
            raise LocalProtocolError(f"data stream count {self.count}: allowed are 1 to {MAX_STREAMS}")
        if not 0 <= self.index < self.count:
            raise LocalProtocolError(f"data stream index {self.index} outside 0..{self.count - 1}")
        if len(self.token) != TOKEN_BYTES:
            raise LocalProtocolError(f"data stream token of {len(self.token)} bytes, not {TOKEN_BYTES}")

    @classmethod
    def make(cls, secret: bytes, migration_id: str, index: int, count: int) -> DataHello:
        return cls(migration_id, index, count, stream_token(secret, migration_id, index, count))

    def encode(self) -> bytes:
        name = self.migration_id.encode()
        return _U16.pack(len(name)) + name + _HELLO_TAIL.pack(self.index, self.count) + self.token

    def check_token(self, secret: bytes) -> None:
        want = stream_token(secret, self.migration_id, self.index, self.count)
        if not hmac.compare_digest(want, self.token):
            raise RemoteProtocolError(
                f"data stream {self.index} of migration {self.migration_id!r} failed authentication "
                "(its token is not from this migration's session)"
            )


def hello_size(received: bytes) -> int:
    """Bytes the hello takes, given at least its first two; raises for an id out of bounds."""
    if len(received) < _U16.size:
        return _U16.size
    id_len = int(_U16.unpack_from(received)[0])
    if not 1 <= id_len <= limits.MAX_NAME_CHARS * 4:  # UTF-8: up to 4 bytes a character
        raise RemoteProtocolError(f"data stream hello: migration id length {id_len} out of bounds")
    return _U16.size + id_len + _HELLO_TAIL.size + TOKEN_BYTES


def decode_hello(raw: bytes) -> DataHello:
    """The hello of exactly `hello_size(raw)` bytes; RemoteProtocolError if it is malformed."""
    if len(raw) != hello_size(raw):
        raise RemoteProtocolError(f"data stream hello of {len(raw)} bytes, expected {hello_size(raw)}")
    (id_len,) = _U16.unpack_from(raw)
    try:
        name = raw[_U16.size : _U16.size + id_len].decode()
        index, count = _HELLO_TAIL.unpack_from(raw, _U16.size + id_len)
        return DataHello(name, index, count, raw[-TOKEN_BYTES:])
    except (UnicodeDecodeError, LocalProtocolError) as err:
        raise RemoteProtocolError(f"data stream hello: {err}") from None


@dataclass(frozen=True, slots=True)
class StreamEnd(Event):
    """Source -> target on a data stream, last: how many batches and page entries it carried."""

    batches: int
    pages: int

    def __post_init__(self) -> None:
        _int_field(self, "batches", 0, limits.U64_MAX)
        _int_field(self, "pages", 0, limits.U64_MAX)


_INT = (int,)
WIRES: Final[Mapping[str, framing.Wire]] = {
    "page_batch": framing.BY_NAME["page_batch"],
    "stream_end": framing.Wire("stream_end", StreamEnd, {"batches": _INT, "pages": _INT}),
}


@dataclass(frozen=True, slots=True)
class Layout:
    """What every batch is checked against: slot -> pages, the page size, the largest payload."""

    slot_pages: Mapping[int, int]
    page_size: int
    max_batch_bytes: int

    def check(self, batch: PageBatch, data_bytes: int | None = None) -> None:
        """`data_bytes`: the page data's size where it travels apart from `batch.data`."""
        pages = self.slot_pages.get(batch.slot)
        if pages is None:
            raise LocalProtocolError(f"unknown slot {batch.slot} (the VM has slots {sorted(self.slot_pages)})")
        data_bytes = batch.data_bytes if data_bytes is None else data_bytes
        if data_bytes != batch.pages.size * self.page_size:
            raise LocalProtocolError(
                f"PageBatch.data is {data_bytes} bytes; {batch.pages.size} pages of "
                f"{self.page_size} bytes need {batch.pages.size * self.page_size}"
            )
        for name, indices in (("page", batch.pages), ("zero page", batch.zero_pages)):
            if indices.size:
                highest = int(indices.max())
                if highest >= pages:
                    raise LocalProtocolError(f"{name} index {highest} outside slot {batch.slot} ({pages} pages)")
        length = framing.page_payload_len(int(batch.pages.size), int(batch.zero_pages.size), self.page_size)
        if length > self.max_batch_bytes:
            raise LocalProtocolError(f"PageBatch payload length {length} exceeds the negotiated max batch")


class DataSender:
    """The source's side of one data stream: events in, bytes out."""

    def __init__(
        self, secret: bytes, index: int, layout: Layout, *, sealed: bool, buffers: seal.Buffers = seal.FRESH
    ) -> None:
        self.index = index
        self._layout = layout
        self._sealer = seal.Sealer(stream_key(secret, index), buffers) if sealed else None
        self.batches = 0
        self.pages = 0
        self.ended = False

    def batch(self, batch: PageBatch, data: Sequence[framing.SendBuffer] = ()) -> list[framing.SendBuffer]:
        """The buffers of one batch (page data as views, or the record's ciphertext reused by
        the next call: write them before the next).

        `data`, if given, is the page data in several buffers, in the order of `batch.pages`
        (runs straight from guest RAM: no gather copy), and `batch.data` is empty. On the wire
        it is one PageBatch like any other: one frame, one record."""
        if self.ended:
            raise LocalProtocolError("PageBatch after StreamEnd")
        if data and batch.data_bytes:
            raise LocalProtocolError("PageBatch data given twice (in the batch and apart)")
        parts = [view for view in (memoryview(part).cast("B") for part in data) if view.nbytes]
        self._layout.check(batch, sum(view.nbytes for view in parts) if data else None)
        buffers = self._encode(batch, parts)
        self.batches += 1
        self.pages += int(batch.pages.size + batch.zero_pages.size)
        return buffers

    def end(self) -> list[framing.SendBuffer]:
        if self.ended:
            raise LocalProtocolError("StreamEnd twice")
        self.ended = True
        return self._encode(StreamEnd(self.batches, self.pages))

    def release(self) -> None:
        if self._sealer is not None:
            self._sealer.release()

    def _encode(self, event: Event, data: Sequence[memoryview] = ()) -> list[framing.SendBuffer]:
        if isinstance(event, StreamEnd):
            header = msgpack.packb(
                {"t": "stream_end", "batches": event.batches, "pages": event.pages}, use_bin_type=True
            )
            buffers: list[framing.SendBuffer] = [framing.PREFIX.pack(len(header), 0) + header]
        else:
            header, buffers = framing.encode(event)
            if data:
                # The same frame as with the data in the batch: only the prefix's payload length
                # counts the parts that follow the index arrays.
                payload = [*buffers[1:], *data]
                length = sum(memoryview(part).nbytes for part in payload)
                buffers = [framing.PREFIX.pack(len(header), length) + header, *payload]
        if self._sealer is not None:
            return self._sealer.seal(buffers)
        return buffers


class DataReceiver:
    """The target's side of one data stream, after its hello: bytes in, events out.

    The edge reads into `receive_buffer()` (exactly what the current frame or record still
    needs), reports with `received(n)` (0 for EOF), and drains `next_event()` until NEED_DATA.
    A PageBatch's arrays and data are valid until the next call to next_event()."""

    def __init__(
        self, secret: bytes, index: int, layout: Layout, *, sealed: bool, buffers: seal.Buffers = seal.FRESH
    ) -> None:
        self.index = index
        self._layout = layout
        largest = framing.PREFIX.size + limits.MAX_HEADER_BYTES + layout.max_batch_bytes
        self._opener = seal.Opener(stream_key(secret, index), largest, reuse=True, buffers=buffers) if sealed else None
        # Clear frames: one buffer of the largest frame, filled frame by frame.
        self._frame = bytearray(largest if not sealed else 0)
        self._need = framing.PREFIX.size  # clear: bytes the current part needs
        self._filled = 0
        self._in_body = False
        self._scratch = bytearray(seal.LENGTH.size)
        self._lent_scratch = False
        self._eof = False
        self._error: str | None = None
        self.batches = 0
        self.pages = 0
        self.ended = False

    def receive_buffer(self) -> memoryview:
        if self._opener is not None:
            if self._opener.missing:
                self._lent_scratch = False
                return self._opener.receive_buffer()
            self._lent_scratch = True
            # Between records: only what the next length prefix still lacks.
            missing = seal.LENGTH.size - self._opener.buffered
            return memoryview(self._scratch)[: max(1, missing)]
        return memoryview(self._frame)[self._filled : self._need]

    def received(self, nbytes: int) -> None:
        if nbytes == 0:
            self._eof = True
            return
        if self._opener is not None:
            if self._lent_scratch:
                self._opener.feed(memoryview(self._scratch)[:nbytes])
            else:
                self._opener.received(nbytes)
            return
        if not 0 < nbytes <= self._need - self._filled:
            raise LocalProtocolError(f"nbytes {nbytes} exceeds the buffer handed out")
        self._filled += nbytes

    def next_event(self) -> PageBatch | StreamEnd | NeedData:
        """The next event, or NEED_DATA; RemoteProtocolError (for good) for anything wrong."""
        if self._error is not None:
            raise RemoteProtocolError(f"data stream {self.index} failed earlier: {self._error}")
        try:
            return self._next()
        except LocalProtocolError as err:
            self._error = f"data stream {self.index}: {err}"
            raise RemoteProtocolError(self._error) from err

    def _next(self) -> PageBatch | StreamEnd | NeedData:
        frame = self._next_frame()
        if frame is None:
            if self._eof and not self.ended:
                raise LocalProtocolError("closed before its end marker (a batch may be missing)")
            return NEED_DATA
        if self.ended:
            raise LocalProtocolError("data after the end marker")
        header, payload = framing.split_frame(frame)
        wire, fields = framing.decode_header(header, WIRES)
        if wire.event is StreamEnd:
            if payload.nbytes:
                raise LocalProtocolError("StreamEnd with a payload")
            end = StreamEnd(**fields)
            if (end.batches, end.pages) != (self.batches, self.pages):
                raise LocalProtocolError(
                    f"end marker counts {end.batches} batches and {end.pages} pages, but the stream "
                    f"carried {self.batches} and {self.pages}"
                )
            self.ended = True
            return end
        framing.check_page_counts(fields["n_pages"], fields["n_zero"])
        want = framing.page_payload_len(fields["n_pages"], fields["n_zero"], self._layout.page_size)
        if payload.nbytes != want:
            raise LocalProtocolError(f"PageBatch payload length {payload.nbytes} does not match its counts ({want})")
        event = framing.build_event(wire, fields, payload)
        assert isinstance(event, PageBatch)
        self._layout.check(event)
        self.batches += 1
        self.pages += int(event.pages.size + event.zero_pages.size)
        return event

    def _next_frame(self) -> memoryview | None:
        if self._opener is not None:
            frame = self._opener.next_frame()
            if frame is None and self._eof and self._opener.buffered:
                raise LocalProtocolError("closed mid-record")
            return frame
        if self._filled < self._need:
            if self._eof and (self._filled or self._in_body):
                raise LocalProtocolError("closed mid-frame")
            return None
        if not self._in_body:
            header_len, payload_len = framing.PREFIX.unpack_from(self._frame)
            framing.check_prefix(header_len, payload_len)
            total = framing.PREFIX.size + header_len + payload_len
            if total > len(self._frame):
                raise LocalProtocolError(
                    f"frame of {total} bytes exceeds the largest a data stream allows ({len(self._frame)})"
                )
            self._in_body, self._need = True, total
            if self._filled < self._need:
                return None
        frame = memoryview(self._frame)[: self._need]
        self._in_body, self._need, self._filled = False, framing.PREFIX.size, 0
        return frame

    def release(self) -> None:
        self._frame = bytearray()
        if self._opener is not None:
            self._opener.release()
