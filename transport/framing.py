"""Frames on the wire, and the mapping between events and frames.

    u32 BE header_len | u32 BE payload_len | header (msgpack map) | payload (raw bytes)

The header map holds "t", the message type, and the message's fields. Only PageBatch and
DeviceState carry a payload. A PageBatch header carries slot, round and the two counts; its
payload is the page indices (u64 LE), the zero-page indices (u64 LE), then the page data.

Decoding checks the type of every field here and leaves ranges to the events themselves; every
failure raises LocalProtocolError, which `Connection.next_event` reports as the peer's fault.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgpack
import numpy as np

from . import limits
from .errors import LocalProtocolError
from .events import (
    Abort,
    Accept,
    Auth,
    Close,
    Commit,
    DeviceState,
    Done,
    Event,
    Hello,
    Loaded,
    PageBatch,
    Progress,
    Query,
    QueryResult,
    Running,
    VmDescription,
    as_view,
)

PREFIX: Final = struct.Struct(">II")
INDEX_BYTES: Final = 8
_LITTLE_ENDIAN: Final = sys.byteorder == "little"

SendBuffer = bytes | memoryview
Payload = Literal["none", "pages", "blob"]

_INT = (int,)
_STR = (str,)
_BIN = (bytes,)
_ARRAY = (tuple,)
_OPT_BIN = (bytes, type(None))
_FEATURES = (dict, tuple)
_MSGPACK_NAMES: Final[Mapping[type, str]] = {
    int: "int",
    str: "str",
    bytes: "bin",
    tuple: "array",
    dict: "map",
    type(None): "nil",
    bool: "bool",
    float: "float",
}


@dataclass(frozen=True, slots=True)
class Wire:
    """How one event type travels: its name in "t", its header fields and their msgpack types."""

    name: str
    event: type[Event]
    fields: Mapping[str, tuple[type, ...]]
    payload: Payload = "none"
    # Fields a frame may lack (older peers neither send nor accept them): sent only to a peer that
    # negotiated OPTIONAL_FIELDS, and only when not None; absent, the event's default holds.
    optional: Mapping[str, tuple[type, ...]] = field(default_factory=dict)


WIRES: Final[tuple[Wire, ...]] = (
    Wire(
        "hello",
        Hello,
        {
            "version_min": _INT,
            "version_max": _INT,
            "node": _STR,
            "nonce": _BIN,
            "auth": _STR,
            "capabilities": _ARRAY,
            "max_batch_bytes": _INT,
        },
    ),
    Wire("auth", Auth, {"mac": _BIN}),
    Wire(
        "vm_description",
        VmDescription,
        {
            "name": _STR,
            "migration_id": _STR,
            "memory": _ARRAY,
            "vcpus": _INT,
            "guest_kind": _STR,
            "cpu_features": _FEATURES,
            "dirty_tracking": _STR,
            "page_size": _INT,
            "arch": _STR,
        },
        optional={"verify": _STR},
    ),
    Wire("accept", Accept, {}),
    Wire("abort", Abort, {"reason": _STR}),
    Wire("page_batch", PageBatch, {"slot": _INT, "round": _INT, "n_pages": _INT, "n_zero": _INT}, "pages"),
    Wire("progress", Progress, {"bytes_received": _INT, "pages_received": _INT, "round": _INT}),
    Wire("device_state", DeviceState, {"kind": _STR}, "blob"),
    Wire("done", Done, {"pages_total": _INT, "digest": _OPT_BIN, "verify": _STR}, optional={"rounds": _INT}),
    Wire("loaded", Loaded, {"digest": _OPT_BIN}, optional={"digest_us": _INT, "load_us": _INT}),
    Wire("commit", Commit, {}),
    Wire("running", Running, {}, optional={"resume_us": _INT, "reply_us": _INT}),
    Wire("query", Query, {"migration_id": _STR}),
    Wire("query_result", QueryResult, {"migration_id": _STR, "state": _STR}),
    Wire("close", Close, {}, optional={"downtime_us": _INT, "total_us": _INT, "guest_downtime_us": _INT}),
)
BY_NAME: Final[Mapping[str, Wire]] = {wire.name: wire for wire in WIRES}
BY_EVENT: Final[Mapping[type[Event], Wire]] = {wire.event: wire for wire in WIRES}

OPTIONAL_FIELDS: Final = "optional-fields"
"""The capability of a peer that accepts the `optional` fields of a Wire; every Connection
offers it, and a peer that does not (an older release) gets frames without them."""

TOLERATES_UNKNOWN_FIELDS: Final = frozenset({"hello"})
"""Hello is read before versions are agreed: a newer peer may add fields, ignored here (and
still covered by the PSK MAC, which takes the header bytes as they travelled)."""


# --- prefix -------------------------------------------------------------------------------------


def check_prefix(header_len: int, payload_len: int) -> None:
    """Static bounds, checked on the 8 bytes before anything else is buffered."""
    if header_len > limits.MAX_HEADER_BYTES:
        raise LocalProtocolError(f"frame header length {header_len} exceeds {limits.MAX_HEADER_BYTES}")
    if header_len == 0:
        raise LocalProtocolError("frame header length 0: every frame has a header")
    if payload_len > limits.HARD_MAX_PAYLOAD_BYTES:
        raise LocalProtocolError(f"frame payload length {payload_len} exceeds {limits.HARD_MAX_PAYLOAD_BYTES}")


def page_payload_len(n_pages: int, n_zero: int, page_size: int) -> int:
    return INDEX_BYTES * (n_pages + n_zero) + n_pages * page_size


def check_page_counts(n_pages: int, n_zero: int) -> None:
    """A PageBatch header's counts, before they size or index anything: never negative, not both
    zero, and each within what the largest payload could hold (one index per entry)."""
    bound = limits.HARD_MAX_PAYLOAD_BYTES // INDEX_BYTES
    for name, count in (("n_pages", n_pages), ("n_zero", n_zero)):
        if not 0 <= count <= bound:
            raise LocalProtocolError(f"PageBatch {name} {count} is outside 0..{bound}")
    if n_pages + n_zero == 0:
        raise LocalProtocolError("PageBatch n_pages and n_zero are both 0: a batch carries pages")


def split_frame(plain: memoryview) -> tuple[bytes, memoryview]:
    """(header, payload) of the one frame an opened record holds; the lengths must fill it exactly."""
    if plain.nbytes < PREFIX.size:
        raise LocalProtocolError(f"sealed record holds {plain.nbytes} bytes, less than a frame prefix")
    header_len, payload_len = PREFIX.unpack_from(plain)
    check_prefix(header_len, payload_len)
    if PREFIX.size + header_len + payload_len != plain.nbytes:
        raise LocalProtocolError(
            f"sealed record holds {plain.nbytes} bytes but its frame is "
            f"{PREFIX.size + header_len + payload_len}: a record carries exactly one frame"
        )
    header = bytes(plain[PREFIX.size : PREFIX.size + header_len])
    return header, plain[PREFIX.size + header_len :]


# --- encoding -----------------------------------------------------------------------------------


def _header_fields(event: Event, optional_fields: bool) -> dict[str, Any]:
    if isinstance(event, Hello):
        return {
            "version_min": event.version_min,
            "version_max": event.version_max,
            "node": event.node,
            "nonce": event.nonce,
            "auth": event.auth,
            "capabilities": sorted(event.capabilities),
            "max_batch_bytes": event.max_batch_bytes,
        }
    if isinstance(event, VmDescription):
        described: dict[str, Any] = {
            "name": event.name,
            "migration_id": event.migration_id,
            "memory": [list(region) for region in event.memory],
            "vcpus": event.vcpus,
            "guest_kind": event.guest_kind,
            "cpu_features": event.cpu_features,
            "dirty_tracking": event.dirty_tracking,
            "page_size": event.page_size,
            "arch": event.arch,
        }
        if optional_fields and event.verify is not None:
            described["verify"] = event.verify
        return described
    if isinstance(event, PageBatch):
        return {
            "slot": event.slot,
            "round": event.round,
            "n_pages": int(event.pages.size),
            "n_zero": int(event.zero_pages.size),
        }
    if isinstance(event, DeviceState):
        return {"kind": event.kind}
    wire = BY_EVENT[type(event)]
    fields = {name: getattr(event, name) for name in wire.fields}
    if optional_fields:
        fields.update((name, value) for name in wire.optional if (value := getattr(event, name)) is not None)
    return fields


def _as_bytes_view(buffer: object) -> memoryview:
    view = as_view(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _index_view(indices: np.ndarray[Any, Any]) -> memoryview:
    little = indices.astype("<u8", copy=False)  # no copy on a little-endian host
    return as_view(little).cast("B")


def payload_buffers(event: Event) -> list[SendBuffer]:
    """The payload as buffers, without copying the page data."""
    if isinstance(event, PageBatch):
        parts = [_index_view(event.pages), _index_view(event.zero_pages), _as_bytes_view(event.data)]
        return [part for part in parts if part.nbytes]
    if isinstance(event, DeviceState):
        return [event.blob] if event.blob else []
    return []


def encode(event: Event, optional_fields: bool = True) -> tuple[bytes, list[SendBuffer]]:
    """(header bytes, [prefix + header, *payload buffers]) for one message event; without
    `optional_fields` (a peer that did not negotiate OPTIONAL_FIELDS), the Wire's optional
    fields are left out."""
    wire = BY_EVENT[type(event)]
    header = msgpack.packb({"t": wire.name, **_header_fields(event, optional_fields)}, use_bin_type=True)
    if len(header) > limits.MAX_HEADER_BYTES:
        raise LocalProtocolError(
            f"{type(event).__name__} header is {len(header)} bytes, more than {limits.MAX_HEADER_BYTES}"
        )
    payload = payload_buffers(event)
    payload_len = sum(memoryview(part).nbytes for part in payload)
    if payload_len > limits.HARD_MAX_PAYLOAD_BYTES:
        raise LocalProtocolError(
            f"{type(event).__name__} payload is {payload_len} bytes, more than {limits.HARD_MAX_PAYLOAD_BYTES}"
        )
    return header, [PREFIX.pack(len(header), payload_len) + header, *payload]


# --- decoding -----------------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return _MSGPACK_NAMES.get(type(value), type(value).__name__)


def decode_header(raw: bytes, wires: Mapping[str, Wire] = BY_NAME) -> tuple[Wire, dict[str, Any]]:
    """The message type and its header fields, each of the msgpack type its message expects.

    `wires` are the message types this stream allows (a data stream allows fewer)."""
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=False,
            max_str_len=limits.MSGPACK_MAX_STR,
            max_bin_len=limits.MSGPACK_MAX_BIN,
            max_array_len=limits.MSGPACK_MAX_ARRAY,
            max_map_len=limits.MSGPACK_MAX_MAP,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types for malformed input
        raise LocalProtocolError(f"frame header is not a valid msgpack map: {exc}") from None
    if not isinstance(header, dict):
        raise LocalProtocolError(f"frame header must be a msgpack map, got {_type_name(header)}")
    name = header.pop("t", None)
    if not isinstance(name, str):
        raise LocalProtocolError(f"frame header has no message type 't' (got {name!r})")
    wire = wires.get(name)
    if wire is None:
        raise LocalProtocolError(f"unknown message type {name[:64]!r}")
    fields: dict[str, Any] = {}
    for key, types in wire.fields.items():
        if key not in header:
            raise LocalProtocolError(f"{name!r} message lacks field {key!r}")
        value = header.pop(key)
        if type(value) not in types:  # exact: a msgpack bool is not an int
            want = " or ".join(_MSGPACK_NAMES[t] for t in types)
            raise LocalProtocolError(f"{name!r} field {key!r} must be {want}, got {_type_name(value)}")
        fields[key] = value
    for key, types in wire.optional.items():
        if key in header:
            value = header.pop(key)
            if type(value) not in types:
                want = " or ".join(_MSGPACK_NAMES[t] for t in types)
                raise LocalProtocolError(f"{name!r} field {key!r} must be {want}, got {_type_name(value)}")
            fields[key] = value
    if header and name not in TOLERATES_UNKNOWN_FIELDS:
        raise LocalProtocolError(f"{name!r} message has unknown field {sorted(header)[0]!r}")
    return wire, fields


def _indices(payload: bytearray | memoryview, count: int, offset: int) -> np.ndarray[Any, Any]:
    array = np.frombuffer(payload, dtype="<u8", count=count, offset=offset)
    if not _LITTLE_ENDIAN:
        array = array.astype(np.uint64)
    array.flags.writeable = False
    return array


def build_event(wire: Wire, fields: dict[str, Any], payload: bytearray | memoryview | None) -> Event:
    """The event for a complete frame; raises LocalProtocolError if a field is out of range.

    PageBatch indices and data are views of `payload`, which the event then owns."""
    body = payload if payload is not None else bytearray()
    if wire.payload == "pages":
        n_pages, n_zero = fields["n_pages"], fields["n_zero"]
        check_page_counts(n_pages, n_zero)
        index_bytes = INDEX_BYTES * (n_pages + n_zero)
        if len(body) < index_bytes:
            raise LocalProtocolError(f"PageBatch payload of {len(body)} bytes cannot hold {n_pages + n_zero} indices")
        return PageBatch(
            slot=fields["slot"],
            round=fields["round"],
            pages=_indices(body, n_pages, 0),
            zero_pages=_indices(body, n_zero, INDEX_BYTES * n_pages),
            data=memoryview(body)[index_bytes:].toreadonly(),
        )
    if wire.payload == "blob":
        return DeviceState(kind=fields["kind"], blob=bytes(body))
    return wire.event(**fields)  # Hello makes its capabilities a frozenset after checking them
