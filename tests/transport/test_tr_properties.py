"""Properties of the sans-IO Connection in both roles, by hypothesis (issue 10, item 5).

Whatever bytes or events come: the only exception is the protocol's own (RemoteProtocolError for
the peer's bytes, LocalProtocolError for this side's misuse, state unchanged), what a Connection
buffers stays within limits.RECEIVE_BUFFER_LIMIT, and every PageBatch handed out lies inside the
VM's memory layout, so applying it to RAM of exactly that layout never writes outside.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tr_helpers import (
    PAGE,
    SLOT0_PAGES,
    SLOT1_PAGES,
    Frames,
    description,
    drive,
    raw_frame,
    sealed_by,
)

from transport import (
    NEED_DATA,
    Abort,
    Close,
    Commit,
    Connection,
    DeviceState,
    Done,
    Event,
    LocalProtocolError,
    Loaded,
    PageBatch,
    Progress,
    Query,
    QueryResult,
    RemoteProtocolError,
    Role,
    Running,
    State,
    limits,
)
from transport.events import Accept

LAYOUT = {0: SLOT0_PAGES, 1: SLOT1_PAGES}
STATES = [
    State.START,
    State.HELLO,
    State.AUTH_SOURCE,
    State.AUTH_TARGET,
    State.READY,
    State.DESCRIBED,
    State.PAGES,
    State.DEVICE_STATE,
    State.LOADING,
    State.LOADED,
    State.COMMITTED,
    State.QUERIED,
    State.ABORTED,
]
MODES = [{}, {"tls": True}]  # psk (sealed after the handshake) and frames in the clear
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def buffered(conn: Connection) -> int:
    """What the connection holds of the peer's bytes that it has not turned into events yet."""
    held = len(conn._buf) - conn._pos
    opener = conn._opener
    return held + (opener.buffered if opener is not None else 0)


class Ram:
    """Guest RAM of exactly the test layout: a batch outside it cannot be applied."""

    def __init__(self) -> None:
        self.slots = {slot: np.zeros((pages, PAGE), np.uint8) for slot, pages in LAYOUT.items()}

    def apply(self, batch: PageBatch) -> None:
        pages = self.slots[batch.slot]
        for indices in (batch.pages, batch.zero_pages):
            assert indices.size == 0 or int(indices.max()) < pages.shape[0], (batch.slot, indices)
        assert batch.data_bytes == batch.pages.size * PAGE
        data = np.frombuffer(batch.data, np.uint8).reshape(-1, PAGE)
        pages[batch.pages.astype(np.intp)] = data  # numpy raises on any index outside
        pages[batch.zero_pages.astype(np.intp)] = 0


def consume(conn: Connection, data: bytes, cuts: list[int], ram: Ram) -> list[Event]:
    """Feed data in pieces at `cuts`, draining events after each; only protocol errors escape."""
    events: list[Event] = []
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    for start, end in zip(bounds, bounds[1:]):
        conn.receive_data(data[start:end])
        assert buffered(conn) <= limits.RECEIVE_BUFFER_LIMIT
        while (event := conn.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            if isinstance(event, PageBatch):
                ram.apply(event)
            events.append(event)
            if type(event).__name__ == "ConnectionClosed":
                return events
    return events


@SETTINGS
@given(
    state=st.sampled_from(STATES),
    role=st.sampled_from(list(Role)),
    mode=st.sampled_from(MODES),
    data=st.binary(max_size=512),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=6),
    eof=st.booleans(),
)
def test_random_bytes_in_any_state_fail_only_as_protocol_errors(
    state: State, role: Role, mode: dict[str, bool], data: bytes, cuts: list[int], eof: bool
) -> None:
    assume(not (mode and state in (State.AUTH_SOURCE, State.AUTH_TARGET)))  # psk states only
    pair = drive(state, **mode)
    conn = pair[0] if role is Role.SOURCE else pair[1]
    try:
        consume(conn, data, cuts, Ram())
        if eof:
            conn.receive_data(b"")
            conn.next_event()
    except RemoteProtocolError as err:
        assert conn.state is State.ERROR and str(err)


# --- page batches: valid, out of range, or inconsistent ----------------------------------------

index = st.integers(min_value=0, max_value=2 * SLOT0_PAGES)
count = st.integers(min_value=-3, max_value=70)


@st.composite
def page_frames(draw: Any) -> bytes:
    """A page_batch frame as a hostile peer that knows the key might write it."""
    slot = draw(st.sampled_from([0, 1, 2, -1]))
    pages = draw(st.lists(index, max_size=6))
    zero = draw(st.lists(index, max_size=6))
    n_pages = draw(st.one_of(st.just(len(pages)), count))
    n_zero = draw(st.one_of(st.just(len(zero)), count))
    data = draw(st.one_of(st.just(bytes(PAGE * len(pages))), st.binary(max_size=3 * PAGE)))
    header = {"t": "page_batch", "slot": slot, "round": draw(st.integers(0, 3)), "n_pages": n_pages, "n_zero": n_zero}
    payload = np.array(pages, "<u8").tobytes() + np.array(zero, "<u8").tobytes() + data
    return bytes(raw_frame(header, payload))


@SETTINGS
@given(
    mode=st.sampled_from(MODES), frames=st.lists(page_frames(), min_size=1, max_size=5), cuts=st.lists(st.integers())
)
def test_page_batches_never_reach_outside_the_layout(
    mode: dict[str, bool], frames: list[bytes], cuts: list[int]
) -> None:
    source, target = drive(State.PAGES, **mode)
    wire = sealed_by(source, Frames(b"".join(frames)))
    ram = Ram()
    try:
        events = consume(target, wire, cuts, ram)
    except RemoteProtocolError:
        assert target.state is State.ERROR
        return
    assert all(isinstance(event, PageBatch) for event in events)


# --- mutated valid conversations ----------------------------------------------------------------


def honest_stream(source: Connection, pages: list[int]) -> bytes:
    batches = [
        PageBatch(
            slot=0,
            round=0,
            pages=np.array(pages[i : i + 4], np.uint64),
            zero_pages=np.empty(0, np.uint64),
            data=bytes(PAGE * len(pages[i : i + 4])),
        )
        for i in range(0, len(pages), 4)
    ]
    out = [source.send(batch) for batch in batches]
    out.append(source.send(DeviceState("vcpu0", b"regs")))
    out.append(source.send(Done(source.pages_transferred, b"d" * 32, "full")))
    return b"".join(out)


@st.composite
def mutations(draw: Any) -> list[tuple[int, int, bytes]]:
    """(position, bytes removed there, bytes put in their place)."""
    return draw(
        st.lists(
            st.tuples(st.integers(min_value=0), st.integers(0, 16), st.binary(max_size=8)),
            min_size=1,
            max_size=4,
        )
    )


def mutate(data: bytes, changes: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for position, removed, added in changes:
        at = position % (len(out) + 1)
        out[at : at + removed] = added
    return bytes(out)


@SETTINGS
@given(
    mode=st.sampled_from(MODES),
    pages=st.lists(st.integers(0, SLOT0_PAGES - 1), min_size=1, max_size=12),
    changes=mutations(),
    cuts=st.lists(st.integers(), max_size=5),
)
def test_mutated_conversations_fail_only_as_protocol_errors(
    mode: dict[str, bool], pages: list[int], changes: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    source, target = drive(State.PAGES, **mode)
    honest = honest_stream(source, pages)
    changed = mutate(honest, changes)
    try:
        consume(target, changed, cuts, Ram())
        target.receive_data(b"")
        target.next_event()
    except RemoteProtocolError:
        assert target.state is State.ERROR
        return
    if not mode and changed != honest:
        raise AssertionError("a changed sealed stream was accepted")


# --- event sequences ----------------------------------------------------------------------------


def page_batch(draw: Any) -> PageBatch:
    slot = draw(st.sampled_from([0, 1]))
    pages = draw(st.lists(st.integers(0, LAYOUT[slot] + 2), max_size=3, unique=True))
    zero = draw(st.lists(st.integers(0, LAYOUT[slot] + 2), max_size=3, unique=True))
    if not pages and not zero:
        zero = [0]
    return PageBatch(
        slot=slot,
        round=0,
        pages=np.array(pages, np.uint64),
        zero_pages=np.array(zero, np.uint64),
        data=bytes(PAGE * len(pages)),
    )


@st.composite
def steps(draw: Any) -> tuple[Role, str, Event | None]:
    role = draw(st.sampled_from(list(Role)))
    kind = draw(
        st.sampled_from(
            [
                "hello",
                "auth",
                "describe",
                "accept",
                "batch",
                "progress",
                "state",
                "done",
                "loaded",
                "commit",
                "running",
                "query",
                "result",
                "abort",
                "close",
            ]
        )
    )
    event: Event | None = {
        "describe": description(),
        "accept": Accept(),
        "progress": Progress(1, 1, 0),
        "state": DeviceState("vcpu0", b"r"),
        "loaded": Loaded(draw(st.sampled_from([None, b"d" * 32]))),
        "commit": Commit(),
        "running": Running(),
        "query": Query("mig-0001"),
        "result": QueryResult("mig-0001", "running"),
        "abort": Abort("why not"),
        "close": Close(),
    }.get(kind)
    if kind == "batch":
        event = page_batch(draw)
    return role, kind, event


@SETTINGS
@given(mode=st.sampled_from([*MODES, {"allow_unauthenticated": True}]), plan=st.lists(steps(), max_size=25))
def test_any_event_sequence_keeps_both_sides_in_step(
    mode: dict[str, bool], plan: list[tuple[Role, str, Event | None]]
) -> None:
    """Sends the protocol refuses leave the state as it was; every send it allows is received by
    the peer as the same event, and both sides end in the same state."""
    pair = drive(State.START, **mode)
    ram = Ram()
    for role, kind, event in plan:
        sender, receiver = pair if role is Role.SOURCE else pair[::-1]
        if kind == "hello":
            event = sender.make_hello()
        elif kind == "auth":
            try:
                event = sender.make_auth()
            except LocalProtocolError:
                continue
        elif kind == "done":
            event = Done(sender.pages_transferred, b"d" * 32, "full")
        assert event is not None
        before = sender.state
        try:
            wire = sender.send(event)
        except LocalProtocolError:
            assert sender.state is before
            continue
        got = consume(receiver, wire, [], ram)
        assert [type(e) for e in got] == [type(event)], (got, event)
        assert sender.state is receiver.state
