"""Table-driven: every message in every state, from either side, both as local misuse and as
peer bytes. What the table forbids is refused with a message naming the event and the state."""

from __future__ import annotations

import pathlib

import pytest
from tr_helpers import S, T, drive, encoded, feed, sample_events, side

from transport import (
    Abort,
    Auth,
    Close,
    Event,
    Hello,
    LocalProtocolError,
    PageBatch,
    RemoteProtocolError,
    Role,
    State,
    VmDescription,
)
from transport.events import MESSAGE_EVENTS
from transport.states import TRANSITIONS, in_flight_after_abort

import transport

REACHABLE = [state for state in State if state is not State.ERROR]
FORBIDDEN = [
    (state, role, event)
    for state in REACHABLE
    for role in Role
    for event in MESSAGE_EVENTS
    if (role, event) not in TRANSITIONS[state]
]
ALLOWED_COUNT = sum(len(row) for row in TRANSITIONS.values())


def _id(case: tuple[State, Role, type[Event]]) -> str:
    state, role, event = case
    return f"{state.value}-{role.value}-{event.__name__}"


def test_table_covers_every_state_and_only_message_events() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.ERROR] == {} and TRANSITIONS[State.CLOSED] == {}
    for row in TRANSITIONS.values():
        for (role, event), following in row.items():
            assert isinstance(role, Role) and event in MESSAGE_EVENTS and following in State
    assert len(FORBIDDEN) + ALLOWED_COUNT == len(REACHABLE) * 2 * len(MESSAGE_EVENTS)


def test_design_section_5_in_the_table() -> None:
    """Either side aborts until Loaded; then only the source, until Commit; then nobody."""
    for state in (State.READY, State.DESCRIBED, State.PAGES, State.DEVICE_STATE, State.LOADING):
        assert (S, Abort) in TRANSITIONS[state] and (T, Abort) in TRANSITIONS[state]
    assert (S, Abort) in TRANSITIONS[State.LOADED]
    assert (T, Abort) not in TRANSITIONS[State.LOADED]
    for state in (State.COMMITTED, State.DONE):
        assert (S, Abort) not in TRANSITIONS[state] and (T, Abort) not in TRANSITIONS[state]
    for state in (State.START, State.HELLO, State.AUTH_SOURCE, State.AUTH_TARGET, State.DESCRIBED_EARLY):
        # Before both Auths: the handshake's own messages, and (rule 4) the source's description
        # right behind its own Auth, after which only the target's Auth may come.
        extra = {(S, VmDescription)} if state is State.AUTH_TARGET else set()
        assert set(TRANSITIONS[state]) - extra <= {(role, event) for role in Role for event in (Hello, Auth)}
    assert TRANSITIONS[State.DESCRIBED_EARLY] == {(T, Auth): State.DESCRIBED}


@pytest.mark.parametrize("case", FORBIDDEN, ids=_id)
def test_local_misuse_is_refused_and_changes_nothing(case: tuple[State, Role, type[Event]]) -> None:
    state, role, event_type = case
    conn, _ = side(drive(state), role)
    with pytest.raises(LocalProtocolError) as info:
        conn.send(sample_events()[event_type])
    message = str(info.value)
    assert event_type.__name__ in message and state.value in message
    assert conn.state is state  # nothing sent, the caller may go on


@pytest.mark.parametrize("case", FORBIDDEN, ids=_id)
def test_peer_misuse_is_a_remote_error_for_good(case: tuple[State, Role, type[Event]]) -> None:
    state, role, event_type = case
    # The sender is the one that aborted, so the receiver has no in-flight allowance (rule 6).
    _, receiver = side(drive(state, aborter=role), role)
    with pytest.raises(RemoteProtocolError) as info:
        feed(receiver, encoded(sample_events()[event_type]))
    message = str(info.value)
    assert event_type.__name__ in message and state.value in message
    assert receiver.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        receiver.next_event()
    with pytest.raises(LocalProtocolError, match="ERROR"):
        receiver.send(Abort("too late"))


def test_hints_name_the_rule() -> None:
    source, target = drive(State.AUTH_TARGET)
    with pytest.raises(LocalProtocolError, match="before authentication completed"):
        source.send(sample_events()[PageBatch])
    source, target = drive(State.DESCRIBED)
    with pytest.raises(LocalProtocolError, match=r"page data \(PageBatch\) before Accept"):
        source.send(sample_events()[PageBatch])
    source, target = drive(State.DEVICE_STATE)
    with pytest.raises(LocalProtocolError, match=r"PageBatch after DeviceState.*DESIGN R9"):
        source.send(sample_events()[PageBatch])


def test_in_flight_sets_follow_the_table() -> None:
    assert in_flight_after_abort([State.PAGES], S) == {
        type(e) for e in sample_events().values() if type(e).__name__ in ("PageBatch", "DeviceState", "Done", "Abort")
    }
    assert in_flight_after_abort([State.LOADING], T) == {
        type(e) for e in sample_events().values() if type(e).__name__ in ("Progress", "Loaded", "Abort")
    }
    assert in_flight_after_abort([State.LOADED], T) == set()
    assert Close not in in_flight_after_abort(list(State), S)


def test_one_module_owns_the_state() -> None:
    """Only states.py names the transition table; only connection.py assigns `state`."""
    package = pathlib.Path(transport.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 7
    for path in modules:
        text = path.read_text()
        if path.name != "states.py":
            assert "TRANSITIONS: " not in text, path.name
        if path.name != "connection.py":
            assert "self.state =" not in text, path.name
