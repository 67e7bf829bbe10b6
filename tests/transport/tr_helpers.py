"""Two Connections back to back in memory, and raw frames for what a hostile peer would send."""

from __future__ import annotations

import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]
import numpy as np

from transport import (
    NEED_DATA,
    Abort,
    Accept,
    Auth,
    Close,
    Commit,
    Connection,
    DeviceState,
    Done,
    Event,
    Hello,
    Loaded,
    PageBatch,
    Progress,
    Query,
    QueryResult,
    Role,
    Running,
    State,
    VmDescription,
)
from transport import framing

KEY = b"0123456789abcdef0123456789abcdef"
OTHER_KEY = b"fedcba9876543210fedcba9876543210"
PAGE = 4096
SLOT0_PAGES = 64
SLOT1_PAGES = 16
MIGRATION_ID = "mig-0001"
S, T = Role.SOURCE, Role.TARGET


_PEERS: weakref.WeakKeyDictionary[Connection, Connection] = weakref.WeakKeyDictionary()


def make_pair(**both: Any) -> tuple[Connection, Connection]:
    """(source, target), authenticated with the same pre-shared key unless told otherwise."""
    if not {"psk", "tls", "allow_unauthenticated"} & both.keys():
        both["psk"] = KEY
    source, target = Connection(S, node="host-a", **both), Connection(T, node="host-b", **both)
    _PEERS[source], _PEERS[target] = target, source
    return source, target


class Frames(bytes):
    """Frames in the clear, built by hand (`raw_frame`, `encoded`): what a peer that knows the key
    but breaks the rules would write. `feed` seals each frame as its own record when the stream
    is sealed at that point (transport/seal.py), so the receiver's frame checks are what these
    bytes test; concatenating Frames keeps them Frames."""

    def __add__(self, other: bytes) -> bytes:  # type: ignore[override]
        joined = bytes(self) + bytes(other)
        return Frames(joined) if isinstance(other, Frames) else joined


def split_frames(data: bytes) -> list[bytes]:
    """Frame by frame, as their prefixes say; a last frame cut short stays as it is."""
    frames, pos = [], 0
    while pos < len(data):
        header_len, payload_len = struct.unpack_from(">II", data, pos) if len(data) - pos >= 8 else (len(data), 0)
        end = min(len(data), pos + 8 + header_len + payload_len)
        frames.append(data[pos:end])
        pos = end
    return frames


def sealed_by(sender: Connection, data: bytes) -> bytes:
    """Hand-built frames as `sender` would put them on the wire: each one sealed once sender's
    stream is sealed, as they are otherwise."""
    sealer = sender.sealer
    if sealer is None:
        return bytes(data)
    return b"".join(b"".join(bytes(part) for part in sealer.seal([frame])) for frame in split_frames(data))


def drain(conn: Connection) -> list[Event]:
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        events.append(event)
        if type(event).__name__ == "ConnectionClosed":
            break
    return events


def feed(conn: Connection, data: bytes) -> list[Event]:
    """conn receives data (Frames are sealed first by conn's peer, as `sealed_by` says)."""
    if isinstance(data, Frames) and conn in _PEERS:
        data = sealed_by(_PEERS[conn], data)
    conn.receive_data(data)
    return drain(conn)


def transfer(sender: Connection, receiver: Connection, event: Event) -> list[Event]:
    """sender sends event, receiver gets the bytes; the events the receiver produced."""
    return feed(receiver, sender.send(event))


def side(pair: tuple[Connection, Connection], role: Role) -> tuple[Connection, Connection]:
    """(the side playing role, its peer)."""
    source, target = pair
    return (source, target) if role is S else (target, source)


def handshake(source: Connection, target: Connection) -> None:
    transfer(source, target, source.make_hello())
    transfer(target, source, target.make_hello())
    if source.state is State.AUTH_SOURCE:
        transfer(source, target, source.make_auth())
        transfer(target, source, target.make_auth())
    assert source.state is target.state is State.READY


def description_header(**changes: object) -> dict[str, object]:
    """A vm_description frame's header as a peer would write it, for hand-built frames."""
    fields: dict[str, object] = {
        "t": "vm_description",
        "name": "vm",
        "migration_id": MIGRATION_ID,
        "memory": [[0, 0, 1 << 20]],
        "vcpus": 1,
        "guest_kind": "workload",
        "cpu_features": {},
        "dirty_tracking": "ring",
        "page_size": 4096,
        "arch": "x86_64",
    }
    fields.update(changes)
    return fields


def description(**changes: Any) -> VmDescription:
    fields: dict[str, Any] = dict(
        name="vm1",
        migration_id=MIGRATION_ID,
        memory=((0, 0, SLOT0_PAGES * PAGE), (1, 1 << 32, SLOT1_PAGES * PAGE)),
        vcpus=2,
        guest_kind="workload",
        cpu_features={"cpuid": [[1, 0, 0x1234]], "pvm": True},
        dirty_tracking="ring",
    )
    fields.update(changes)
    return VmDescription(**fields)


def page_bytes(slot: int, page: int, round_: int = 0) -> bytes:
    """Recognisable content: every page tells its slot, index and round."""
    stamp = struct.pack("<III", slot, page, round_)
    return (stamp * (PAGE // len(stamp) + 1))[:PAGE]


def u64(*values: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
    return np.array(values, dtype=np.uint64)


def batch(slot: int, pages: Sequence[int], zero: Sequence[int] = (), round_: int = 0) -> PageBatch:
    data = b"".join(page_bytes(slot, page, round_) for page in pages)
    return PageBatch(
        slot=slot,
        round=round_,
        pages=np.array(pages, dtype=np.uint64),
        zero_pages=np.array(zero, dtype=np.uint64),
        data=bytearray(data),
    )


def sample_events() -> dict[type[Event], Event]:
    """One valid instance of every message type."""
    return {
        Hello: Hello(1, 1, "x", b"n" * 32, "psk", frozenset(), 8 << 20),
        Auth: Auth(b"m" * 32),
        VmDescription: description(),
        Accept: Accept(),
        Abort: Abort("sample"),
        PageBatch: batch(0, [1]),
        Progress: Progress(0, 0, 0),
        DeviceState: DeviceState("vcpu0", b"regs"),
        Done: Done(0, None, "off"),
        Loaded: Loaded(None),
        Commit: Commit(),
        Running: Running(),
        Query: Query(MIGRATION_ID),
        QueryResult: QueryResult(MIGRATION_ID, "unknown"),
        Close: Close(),
    }


# The happy path as steps: (state reached, sender, event factory).
Step = tuple[State, Role, Callable[[Connection], Event]]
HAPPY: tuple[Step, ...] = (
    (State.HELLO, S, lambda c: c.make_hello()),
    (State.AUTH_SOURCE, T, lambda c: c.make_hello()),
    (State.AUTH_TARGET, S, lambda c: c.make_auth()),
    (State.READY, T, lambda c: c.make_auth()),
    (State.DESCRIBED, S, lambda c: description()),
    (State.PAGES, T, lambda c: Accept()),
    (State.DEVICE_STATE, S, lambda c: DeviceState("vcpu0", b"regs")),
    (State.LOADING, S, lambda c: Done(c.pages_transferred, None, "off")),
    (State.LOADED, T, lambda c: Loaded(None)),
    (State.COMMITTED, S, lambda c: Commit()),
    (State.DONE, T, lambda c: Running()),
)
QUERY: tuple[Step, ...] = (
    (State.QUERIED, S, lambda c: Query(MIGRATION_ID)),
    (State.ANSWERED, T, lambda c: QueryResult(MIGRATION_ID, "running")),
)


def drive(state: State, *, aborter: Role = S, **both: Any) -> tuple[Connection, Connection]:
    """A fresh pair with both sides in `state`, reached the ordinary way."""
    pair = make_pair(**both)
    if state is State.START:
        return pair
    opening = list(HAPPY[:4])
    if "psk" not in both and {"tls", "allow_unauthenticated"} & both.keys():
        # Without a psk both Hellos lead straight to READY (states.SKIP_WITHOUT_PSK).
        opening = [HAPPY[0], (State.READY, T, HAPPY[1][2])]
    path = opening + list(HAPPY[4:])
    ending: list[tuple[Role, Event]] = []
    if state is State.DESCRIBED_EARLY:
        # The source's description right behind its own Auth (states.py rule 4).
        path = [*HAPPY[:3], (State.DESCRIBED_EARLY, S, lambda c: description())]
    elif state in (State.QUERIED, State.ANSWERED):
        path = opening + list(QUERY)
    elif state in (State.ABORTED, State.SOURCE_CLOSED, State.TARGET_CLOSED, State.CLOSED):
        path = opening
        ending = [(aborter, Abort("operator cancelled"))]
        if state in (State.SOURCE_CLOSED, State.CLOSED):
            ending.append((S, Close()))
        if state in (State.TARGET_CLOSED, State.CLOSED):
            ending.append((T, Close()))
    for reached, role, make in path:
        sender, receiver = side(pair, role)
        transfer(sender, receiver, make(sender))
        assert pair[0].state is pair[1].state is reached, (reached, pair[0].state)
        if reached is state:
            return pair
    for role, event in ending:
        sender, receiver = side(pair, role)
        transfer(sender, receiver, event)
    assert pair[0].state is pair[1].state is state
    return pair


def raw_frame(header: dict[str, Any], payload: bytes = b"", *, payload_len: int | None = None) -> bytes:
    """A frame exactly as given: nothing checked, as a hostile peer would write it."""
    body: bytes = msgpack.packb(header, use_bin_type=True)
    length = len(payload) if payload_len is None else payload_len
    return Frames(struct.pack(">II", len(body), length) + body + payload)


def encoded(event: Event) -> bytes:
    """The frame for event without any state check: what a peer that ignores the rules sends."""
    return Frames(b"".join(bytes(part) for part in framing.encode(event)[1]))
