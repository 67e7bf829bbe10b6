"""A man in the middle for migration tests: a real TCP proxy between two real daemons.

The proxy cuts each direction of the stream into units (frames during the handshake; after a
side's Auth, the sealed records of protocol version 2, or frames again with version 1) and hands
each unit to an `Attack`, which says what to forward instead: the unit, a changed copy, nothing,
or more. It works against both protocol versions, so the same test shows what an older build let
through.

With sealed records the proxy still has to find its target (the page batch, the Done): it opens a
copy of each record with the test's own key, for aiming only. What it forwards is never sealed
by it: a change is what an attacker without the key can do, an XOR of ciphertext bytes with
(old plaintext ^ new plaintext), since GCM encrypts as a stream cipher; a drop, a replay or an
injection moves or adds bytes as they are.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]

from transport.datastream import MAGIC as DATA_MAGIC

PREFIX = struct.Struct(">II")
RECORD_LENGTH = struct.Struct(">I")
TAG_BYTES = 16
S2T, T2S = "source->target", "target->source"


@dataclass
class Unit:
    """One frame (or the record that carries it) as it travelled."""

    direction: str
    raw: bytes  # the bytes on the wire
    plain: bytes  # the frame inside (== raw when not sealed)
    sealed: bool
    kind: str | None  # the message type, from the frame's header
    fields: dict[str, Any]

    def payload(self) -> bytes:
        header_len, _ = PREFIX.unpack_from(self.plain)
        return self.plain[PREFIX.size + header_len :]


def frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    body = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(len(body), len(payload)) + body + payload


def rewritten(unit: Unit, new_plain: bytes) -> bytes:
    """The unit changed to carry `new_plain`, as far as an attacker without the key can do it."""
    if not unit.sealed:
        return new_plain
    body = unit.raw[RECORD_LENGTH.size : -TAG_BYTES]
    common = min(len(body), len(new_plain))
    ciphertext = bytes(c ^ a ^ b for c, a, b in zip(body[:common], unit.plain[:common], new_plain[:common]))
    ciphertext += os.urandom(len(new_plain) - common)  # no keystream for bytes that were not there
    return RECORD_LENGTH.pack(len(ciphertext) + TAG_BYTES) + ciphertext + unit.raw[-TAG_BYTES:]


def flip_bit(unit: Unit, plain_offset: int) -> bytes:
    changed = bytearray(unit.plain)
    changed[plain_offset] ^= 0x10
    return rewritten(unit, bytes(changed))


Attack = Callable[["Link", Unit], list[bytes]]


@dataclass
class Link:
    """What the proxy knows of one connection: both Hellos, which directions are sealed."""

    psk: bytes
    hellos: dict[str, dict[str, Any]] = field(default_factory=dict)
    sealed: dict[str, bool] = field(default_factory=lambda: {S2T: False, T2S: False})
    opened: dict[str, int] = field(default_factory=lambda: {S2T: 0, T2S: 0})
    notes: dict[str, Any] = field(default_factory=dict)  # the attack's own memory
    lock: threading.Lock = field(default_factory=threading.Lock)
    # A data stream (transport/datastream.py) of the migration on `control`: it shares that
    # link's notes (one attack, whichever connection its target travels on).
    control: Link | None = None
    data_index: int | None = None

    def version(self) -> int:
        return min(int(hello["version_max"]) for hello in self.hellos.values())

    def open_for_aiming(self, direction: str, prefix: bytes, body: bytes) -> bytes | None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from transport import Role, seal

        sender = Role.SOURCE if direction == S2T else Role.TARGET
        if self.control is not None:
            from transport.datastream import stream_key, stream_secret

            hellos = self.control.hellos
            secret = stream_secret(self.psk, hellos[S2T]["nonce"], hellos[T2S]["nonce"])
            key = stream_key(secret, self.data_index or 0)
        else:
            key = seal.derive_key(self.psk, self.hellos[S2T]["nonce"], self.hellos[T2S]["nonce"], sender)
        sequence = self.opened[direction]
        self.opened[direction] += 1
        try:
            return AESGCM(key).decrypt(struct.pack(">4xQ", sequence), body, prefix)
        except Exception:
            return None


def _read_exact(sock: socket.socket, count: int) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 1 << 20))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _decode(plain: bytes) -> tuple[str | None, dict[str, Any]]:
    try:
        header_len, _ = PREFIX.unpack_from(plain)
        header = msgpack.unpackb(plain[PREFIX.size : PREFIX.size + header_len], raw=False)
        return str(header.pop("t")), header
    except Exception:
        return None, {}


class Proxy:
    """Listens on 127.0.0.1; each connection it accepts is relayed to `upstream` through `attack`."""

    def __init__(self, upstream: str, psk: bytes, attack: Attack) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.psk = psk
        self.attack = attack
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.links: list[Link] = []
        self.data_links: list[Link] = []
        self.errors: list[str] = []
        self._sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            link = Link(self.psk)
            if client.recv(1, socket.MSG_PEEK) == DATA_MAGIC[:1]:
                # A data stream opens after its control connection's handshake.
                link.control = next(c for c in self.links if len(c.hellos) == 2)
                link.notes = link.control.notes
                self.data_links.append(link)
            else:
                self.links.append(link)
            for args in ((client, server, S2T, link), (server, client, T2S, link)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, link: Link) -> None:
        try:
            while (unit := self._read_unit(src, direction, link)) is not None:
                for data in self.attack(link, unit):
                    dst.sendall(data)
        except OSError:
            pass
        except Exception as err:  # a bug in the test's attack: make it visible
            self.errors.append(f"{direction}: {err!r}")
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _read_unit(self, sock: socket.socket, direction: str, link: Link) -> Unit | None:
        if link.control is not None and direction == S2T and link.data_index is None:
            # Magic and hello, in the clear (psk), passed on as one unit.
            head = _read_exact(sock, len(DATA_MAGIC) + 2)
            if head is None:
                return None
            (id_len,) = struct.unpack_from(">H", head, len(DATA_MAGIC))
            rest = _read_exact(sock, id_len + 4 + 32)
            if rest is None:
                return None
            with link.lock:
                link.data_index = struct.unpack_from(">H", rest, id_len)[0]
                link.sealed[S2T] = link.control.sealed[S2T]
            return Unit(direction, head + rest, b"", False, "data_hello", {})
        if link.sealed[direction]:
            prefix = _read_exact(sock, RECORD_LENGTH.size)
            if prefix is None:
                return None
            body = _read_exact(sock, RECORD_LENGTH.unpack(prefix)[0])
            if body is None:
                return None
            with link.lock:
                plain = link.open_for_aiming(direction, prefix, body)
            kind, fields = _decode(plain) if plain is not None else (None, {})
            return Unit(direction, prefix + body, plain or b"", True, kind, fields)
        head = _read_exact(sock, PREFIX.size)
        if head is None:
            return None
        header_len, payload_len = PREFIX.unpack(head)
        rest = _read_exact(sock, header_len + payload_len)
        if rest is None:
            return None
        raw = head + rest
        kind, fields = _decode(raw)
        with link.lock:
            if kind == "hello":
                link.hellos[direction] = fields
            elif kind == "auth":
                # This side's frames after its Auth are sealed from protocol version 2 on.
                link.sealed[direction] = link.version() >= 2
        return Unit(direction, raw, raw, False, kind, fields)
