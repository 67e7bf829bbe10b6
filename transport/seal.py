"""Sealed records: after a psk handshake, every frame travels inside an AEAD record (DESIGN 6).

    u32 BE sealed_len | AES-256-GCM ciphertext of exactly one frame | 16-byte tag

sealed_len counts ciphertext and tag. Rules of this file:

1. One key per direction, HKDF-SHA256 over the pre-shared key with both Hello nonces as salt and
   the direction in `info`: a record sealed by the source never opens as one from the target, and
   keys from an earlier connection (other nonces) open nothing in this one.
2. The GCM nonce is 4 zero bytes and the record's u64 BE sequence number in its direction,
   counted from 0 by both sides. A record dropped, reordered, replayed or injected is opened
   under the wrong sequence number and fails its tag like a changed byte does: every one of these
   ends the connection. The sequence number never repeats under one key (fresh nonces give fresh
   keys per connection), which is what GCM requires.
3. The length bytes are the associated data, so they are authenticated too.
4. Nothing of a record is handed out before its tag was checked: the decrypted frame appears only
   after `decrypt_into` verified the whole record. A whole frame (a page batch of up to the
   negotiated batch size) is one record: the per-record cost is paid per batch, not per page.

No sockets here: `Sealer` turns a frame's buffers into a record's, `Opener` turns received bytes
into frames.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import limits
from .errors import LocalProtocolError
from .states import Role

LABEL: Final = b"migrated-aead-v2 "
KEY_BYTES: Final = 32
"""AES-256."""
TAG_BYTES: Final = 16
LENGTH: Final = struct.Struct(">I")
_NONCE: Final = struct.Struct(">4xQ")
_SEQUENCE_LIMIT: Final = 1 << 64
_BLOCK_BYTES: Final = 16

Buffer = bytes | memoryview


class Buffers(Protocol):
    """Where a Sealer or Opener gets its one large buffer and gives it back (release, or when
    it needs a larger one). A fresh buffer of a record's size costs more than the AES-GCM that
    fills it (its pages are faulted and zeroed: ~3 ms for 4 MiB here, against 0.5 ms to seal
    it), so the data streams reuse them across streams and migrations (the edge's pool)."""

    def take(self, size: int) -> bytearray:
        """A buffer of at least `size` bytes, owned by the caller until given back."""
        ...

    def give(self, buffer: bytearray) -> None:
        """A buffer taken before, no longer used (no view of it is used after this)."""
        ...


class FreshBuffers:
    """A new buffer each time, dropped when given back."""

    def take(self, size: int) -> bytearray:
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        pass


FRESH: Final = FreshBuffers()


def derive_key(psk: bytes, source_nonce: bytes, target_nonce: bytes, sender: Role) -> bytes:
    """The key of the records `sender` seals, for the connection whose Hellos carried these nonces."""
    info = LABEL + f"{sender.value}->{sender.peer.value}".encode()
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=source_nonce + target_nonce, info=info)
    return hkdf.derive(psk)


def _nonce(sequence: int) -> bytes:
    if sequence >= _SEQUENCE_LIMIT:
        raise LocalProtocolError("record sequence number exhausted: 2**64 records under one key")
    return _NONCE.pack(sequence)


# Up to this size (ciphertext and tag) a record is sealed in one AEAD call from a joined copy of
# its frame; above it, streamed from the frame's buffers where they lie (no copy of page data).
SMALL_RECORD_BYTES: Final = 64 << 10


class Sealer:
    """This side's records, in order."""

    def __init__(self, key: bytes, buffers: Buffers = FRESH) -> None:
        self._key = key
        self._aead = AESGCM(key)  # set up once: a small record costs one call, not a new context
        self.sequence = 0
        """The sequence number of the next record."""
        self._buffers = buffers
        self._out = bytearray()  # reused: a fresh 8 MiB per batch costs page faults, not just bytes

    def release(self) -> None:
        """Give the reused buffer back (the stream is closed; it grows again if sealing resumes)."""
        if self._out:
            self._buffers.give(self._out)
        self._out = bytearray()

    def _room(self, size: int) -> memoryview:
        """The reused buffer, at least `size` bytes."""
        if len(self._out) < size:
            self.release()
            self._out = self._buffers.take(size)
        return memoryview(self._out)

    def seal(self, frame: Sequence[Buffer]) -> list[Buffer]:
        """The record for one frame given as buffers: [length, ciphertext and tag] for a small
        frame, [length, ciphertext, tag] for a larger one. Either is written into one buffer
        this Sealer reuses: the ciphertext is valid until the next call to seal().

        A larger frame is encrypted by streaming GCM, each buffer where it lies (page data
        straight from guest RAM)."""
        sizes = [memoryview(part).nbytes for part in frame]
        length = sum(sizes) + TAG_BYTES
        if length > limits.U32_MAX:
            raise LocalProtocolError(f"frame of {length} bytes does not fit one record")
        prefix = LENGTH.pack(length)
        if length <= SMALL_RECORD_BYTES:
            # Control messages (the cutover's among them): a streaming context costs 4 us warm
            # and 50-80 us cold inside a downtime (its Python layers), the kept AEAD one call;
            # joining a small frame's parts costs less than either.
            data = frame[0] if len(frame) == 1 else b"".join(frame)
            record = self._room(length)[:length]
            self._aead.encrypt_into(_nonce(self.sequence), data, prefix, record)
            self.sequence += 1
            return [prefix, record]
        encryptor = Cipher(algorithms.AES(self._key), modes.GCM(_nonce(self.sequence))).encryptor()
        encryptor.authenticate_additional_data(prefix)
        # update_into wants room for one block more than it is given.
        out, filled = self._room(length + _BLOCK_BYTES), 0
        for part, size in zip(frame, sizes):
            if size:
                filled += encryptor.update_into(part, out[filled:])
        rest = encryptor.finalize()  # GCM holds nothing back; copied should that ever change
        out[filled : filled + len(rest)] = rest
        filled += len(rest)
        self.sequence += 1
        return [prefix, out[:filled], encryptor.tag]


class Opener:
    """The peer's records, in order: bytes in, one authenticated frame out per record.

    `max_frame` bounds a record before any of it is buffered. With `reuse`, records are received
    into one buffer and every frame is decrypted into a second one, both kept (from `buffers`),
    so a frame is valid only until the next call to `next_frame`. Never in place: cryptography
    refuses overlapping input and output from version 51 (ValueError), and earlier versions
    never promised it."""

    def __init__(self, key: bytes, max_frame: int, *, reuse: bool = False, buffers: Buffers = FRESH) -> None:
        self._aead = AESGCM(key)
        self._buffers = buffers
        self._max_frame = max_frame
        self._reuse = reuse
        self.sequence = 0
        """The sequence number of the next record."""
        self._head = bytearray()  # received bytes not yet in a record: a length, later records
        self._prefix = b""
        self._record: bytearray | None = None  # ciphertext and tag of the record arriving
        self._record_buffer: bytearray | None = None  # reused: records are received into it
        self._plain_buffer: bytearray | None = None  # reused: frames are decrypted into it
        self._filled = 0

    @property
    def missing(self) -> int:
        """Bytes of the current record not yet received; 0 between records."""
        return 0 if self._record is None else self._length - self._filled

    @property
    def buffered(self) -> int:
        """Bytes received and not yet opened (a started record's length bytes included)."""
        started = LENGTH.size if self._record is not None else 0
        return len(self._head) + started + self._filled

    @property
    def _length(self) -> int:
        return int(LENGTH.unpack(self._prefix)[0])

    def feed(self, data: memoryview) -> None:
        """Bytes as received. The caller bounds how much it feeds before draining next_frame."""
        missing = self.missing
        if missing and self._record is not None:
            take = min(missing, data.nbytes)
            self._record[self._filled : self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
        if data.nbytes:
            self._head += data

    def receive_buffer(self) -> memoryview:
        """Where the rest of the current record may be read to (no copy); only while `missing`."""
        assert self._record is not None and self.missing
        return memoryview(self._record)[self._filled : self._length]

    def received(self, nbytes: int) -> None:
        """nbytes were written to the buffer from receive_buffer()."""
        if not 0 < nbytes <= self.missing:
            raise LocalProtocolError(f"nbytes {nbytes} exceeds the buffer handed out")
        self._filled += nbytes

    def next_frame(self) -> memoryview | None:
        """The next record's frame once its tag checked out, or None until the record is complete.

        Raises LocalProtocolError for a record length out of bounds or a record that fails
        authentication (changed, dropped, reordered, replayed or injected bytes)."""
        if self._record is None:
            if len(self._head) < LENGTH.size:
                return None
            self._start_record()
        if self.missing:
            return None
        assert self._record is not None
        record = memoryview(self._record)[: self._length]
        size = self._length - TAG_BYTES
        out = memoryview(self._plain(size))[:size] if self._reuse else memoryview(bytearray(size))
        try:
            self._aead.decrypt_into(_nonce(self.sequence), record, self._prefix, out)
        except InvalidTag:
            raise LocalProtocolError(
                f"sealed record {self.sequence} failed authentication: bytes were changed, dropped, "
                "reordered, replayed or injected on the way"
            ) from None
        self.sequence += 1
        self._record, self._filled = None, 0
        return out.toreadonly()

    def release(self) -> None:
        """Drop every buffer held (the stream is closed): a record half received is dropped too."""
        self._head = bytearray()
        for buffer in (self._record_buffer, self._plain_buffer):
            if buffer is not None:
                self._buffers.give(buffer)
        self._record = self._record_buffer = self._plain_buffer = None
        self._filled = 0

    def _plain(self, size: int) -> bytearray:
        """The kept buffer frames are decrypted into, at least `size` bytes."""
        if self._plain_buffer is None or len(self._plain_buffer) < size:
            if self._plain_buffer is not None:
                self._buffers.give(self._plain_buffer)
            self._plain_buffer = self._buffers.take(size)
        return self._plain_buffer

    def _start_record(self) -> None:
        prefix = bytes(self._head[: LENGTH.size])
        (length,) = LENGTH.unpack(prefix)
        if length <= TAG_BYTES:
            raise LocalProtocolError(f"sealed record {self.sequence} of {length} bytes: shorter than its tag")
        if length - TAG_BYTES > self._max_frame:
            raise LocalProtocolError(
                f"sealed record {self.sequence} of {length} bytes exceeds the largest frame allowed "
                f"now ({self._max_frame} bytes and a {TAG_BYTES}-byte tag)"
            )
        if self._record_buffer is None or len(self._record_buffer) < length:
            if self._record_buffer is not None:
                self._buffers.give(self._record_buffer)
            self._record_buffer = self._buffers.take(length)
        self._prefix, self._record = prefix, self._record_buffer
        take = min(length, len(self._head) - LENGTH.size)
        with memoryview(self._head) as head:  # one copy, not a slice and then a copy
            self._record[:take] = head[LENGTH.size : LENGTH.size + take]
        del self._head[: LENGTH.size + take]
        self._filled = take
