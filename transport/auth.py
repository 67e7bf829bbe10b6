"""Pre-shared-key authentication: an HMAC over the handshake transcript, one per direction.

mac = HMAC-SHA256(key, transcript(sender)), where the transcript is, each variable part prefixed
by its u32 BE length so that no two transcripts share bytes:

    "migrated-psk-v1" | sender role ("source" or "target") | source nonce | target nonce |
    source Hello header | target Hello header

The Hello headers are the exact msgpack bytes each Hello travelled in (our encoder is canonical:
fixed key order, sorted capabilities), so the MAC covers every negotiated value and a
man-in-the-middle cannot change one unnoticed. The sender's role keeps a side's MAC from being
reflected back as the other's; both fresh nonces keep an old MAC from being replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from . import limits
from .errors import LocalProtocolError
from .states import Role

LABEL = b"migrated-psk-v1"
_LENGTH = struct.Struct(">I")


def new_nonce() -> bytes:
    return secrets.token_bytes(limits.NONCE_BYTES)


def check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise LocalProtocolError(f"psk must be bytes, got {type(key).__name__}")
    if len(key) < limits.MIN_PSK_BYTES:
        raise LocalProtocolError(f"psk is {len(key)} bytes; a key needs at least {limits.MIN_PSK_BYTES}")
    return bytes(key)


@dataclass(frozen=True, slots=True)
class Transcript:
    """What both sides saw during HELLO, in a fixed order (source first)."""

    source_nonce: bytes
    target_nonce: bytes
    source_hello: bytes
    target_hello: bytes

    def encode(self, sender: Role) -> bytes:
        parts = (
            LABEL,
            sender.value.encode(),
            self.source_nonce,
            self.target_nonce,
            self.source_hello,
            self.target_hello,
        )
        return b"".join(_LENGTH.pack(len(part)) + part for part in parts)


def compute_mac(key: bytes, transcript: Transcript, sender: Role) -> bytes:
    return hmac.new(key, transcript.encode(sender), hashlib.sha256).digest()


def verify_mac(key: bytes, transcript: Transcript, sender: Role, mac: bytes) -> bool:
    """Constant-time comparison with the MAC `sender` should have sent."""
    return hmac.compare_digest(compute_mac(key, transcript, sender), mac)
