"""DESIGN section 5 on the wire: who may abort when, messages that cross an Abort, EOF in every
phase, and in-doubt resolution with Query on a new connection."""

from __future__ import annotations

from typing import Literal

import pytest
from tr_helpers import (
    MIGRATION_ID,
    S,
    T,
    batch,
    description,
    drain,
    drive,
    encoded,
    feed,
    handshake,
    make_pair,
    side,
    transfer,
)

from transport import (
    Abort,
    Close,
    Commit,
    ConnectionClosed,
    DeviceState,
    Done,
    Loaded,
    LocalProtocolError,
    Progress,
    Query,
    QueryResult,
    RemoteProtocolError,
    Role,
    Running,
    State,
)

BEFORE_LOADED = [State.READY, State.DESCRIBED, State.PAGES, State.DEVICE_STATE, State.LOADING]
ABORTS = [(state, role) for state in BEFORE_LOADED for role in Role] + [(State.LOADED, S)]


@pytest.mark.parametrize(("state", "role"), ABORTS, ids=lambda x: getattr(x, "value", x))
def test_abort_where_design_allows_it(state: State, role: Role) -> None:
    pair = drive(state)
    sender, receiver = side(pair, role)
    assert transfer(sender, receiver, Abort("operator cancelled")) == [Abort("operator cancelled")]
    for conn in pair:
        assert conn.state is State.ABORTED
        assert conn.aborted == Abort("operator cancelled") and conn.aborted_by is role
    transfer(sender, receiver, Close())
    transfer(receiver, sender, Close())
    for conn in pair:
        assert conn.state is State.CLOSED
        assert feed(conn, b"") == [ConnectionClosed(clean=True)]


@pytest.mark.parametrize(
    ("state", "role", "rule"),
    [
        (State.COMMITTED, S, "Abort after Commit"),
        (State.DONE, S, "Abort after Commit"),
        (State.LOADED, T, "Abort after Loaded"),
        (State.COMMITTED, T, "Abort after Loaded"),
    ],
)
def test_abort_refused_where_design_forbids_it(state: State, role: Role, rule: str) -> None:
    sender, receiver = side(drive(state), role)
    with pytest.raises(LocalProtocolError, match=rule):
        sender.send(Abort("changed my mind"))
    assert sender.state is state
    with pytest.raises(RemoteProtocolError, match=rule):
        feed(receiver, encoded(Abort("changed my mind")))
    assert receiver.state is State.ERROR


def test_target_abort_crossing_the_source_stream() -> None:
    """The target aborts while pages, state and Done are on their way: they are checked and
    dropped, not called protocol errors; the source sees the Abort after its Done."""
    source, target = drive(State.PAGES)
    in_flight = b"".join(
        source.send(event) for event in (batch(0, [1, 2]), DeviceState("vcpu0", b"r"), Done(2, None, "off"))
    )
    abort = target.send(Abort("target out of memory"))
    assert feed(target, in_flight) == []
    assert target.dropped_after_abort == 3 and target.state is State.ABORTED
    assert target.pages_transferred == 2  # what the stream carried, dropped or not
    before = source.state
    assert feed(source, abort) == [Abort("target out of memory")]
    assert (before, source.state) == (State.LOADING, State.ABORTED)


def test_dropped_messages_are_still_checked() -> None:
    source, target = drive(State.PAGES)
    bad = encoded(batch(0, [999]))
    target.send(Abort("no"))
    with pytest.raises(RemoteProtocolError, match=r"page index 999 outside slot 0 \(64 pages\)"):
        feed(target, bad)


def test_source_abort_crossing_progress_and_loaded() -> None:
    source, target = drive(State.LOADING)
    in_flight = target.send(Progress(10, 3, 0)) + target.send(Loaded(None))
    abort = source.send(Abort("downtime limit exceeded"))
    assert feed(source, in_flight) == []
    assert source.dropped_after_abort == 2
    assert feed(target, abort) == [Abort("downtime limit exceeded")]
    assert target.state is State.ABORTED


def test_aborts_crossing_each_other_are_both_delivered() -> None:
    source, target = drive(State.PAGES)
    from_source, from_target = source.send(Abort("source")), target.send(Abort("target"))
    assert feed(source, from_target) == [Abort("target")]
    assert feed(target, from_source) == [Abort("source")]
    assert source.aborted_by is S and target.aborted_by is T  # each keeps its own first abort
    with pytest.raises(RemoteProtocolError, match="Abort not allowed"):
        feed(source, encoded(Abort("target again")))


def test_nothing_crosses_an_abort_sent_after_loaded() -> None:
    """After Loaded the target waits: nothing of it can be in flight when the source aborts."""
    source, target = drive(State.LOADED)
    source.send(Abort("operator"))
    with pytest.raises(RemoteProtocolError, match=r"Loaded not allowed \(state ABORTED"):
        feed(source, encoded(Loaded(None)))


def test_in_flight_allowance_ends_with_the_peers_close() -> None:
    source, target = drive(State.PAGES)
    feed(source, target.send(Abort("no")))
    feed(target, source.send(Close()))
    assert target.state is State.SOURCE_CLOSED
    with pytest.raises(RemoteProtocolError, match="PageBatch not allowed"):
        feed(target, encoded(batch(0, [1])))


def test_nothing_after_abort_but_close() -> None:
    source, target = drive(State.PAGES)
    transfer(target, source, Abort("no"))
    with pytest.raises(LocalProtocolError, match=r"PageBatch not allowed \(state ABORTED"):
        source.send(batch(0, [1]))
    with pytest.raises(LocalProtocolError, match=r"Commit not allowed"):
        source.send(Commit())


# --- EOF ----------------------------------------------------------------------------------------

UNCLEAN = [
    s
    for s in State
    if s not in (State.DONE, State.ANSWERED, State.CLOSED, State.ERROR, State.SOURCE_CLOSED, State.TARGET_CLOSED)
]


@pytest.mark.parametrize("state", UNCLEAN, ids=lambda s: s.value)
def test_eof_before_the_end_is_unclean(state: State) -> None:
    for conn in drive(state):
        before = conn.state
        assert feed(conn, b"") == [ConnectionClosed(clean=False)]
        assert conn.next_event() == ConnectionClosed(clean=False)  # and stays so
        assert conn.state is before  # the edge decides what a broken link means here


@pytest.mark.parametrize("state", [State.DONE, State.ANSWERED, State.CLOSED])
def test_eof_after_the_end_is_clean(state: State) -> None:
    for conn in drive(state):
        assert feed(conn, b"") == [ConnectionClosed(clean=True)]


def test_eof_after_the_peers_close_is_clean_not_after_ours() -> None:
    source, target = drive(State.SOURCE_CLOSED)
    assert feed(target, b"") == [ConnectionClosed(clean=True)]
    assert feed(source, b"") == [ConnectionClosed(clean=False)]


def test_events_before_eof_come_first() -> None:
    source, target = drive(State.COMMITTED)
    target.receive_data(b"")
    source.receive_data(target.send(Running()))
    source.receive_data(b"")
    assert drain(source) == [Running(), ConnectionClosed(clean=True)]


def test_sending_after_the_peers_eof_is_still_possible() -> None:
    source, target = drive(State.DONE)
    feed(source, b"")
    assert source.send(Close())


# --- DESIGN 5: the three outcomes and in-doubt resolution ----------------------------------------


def test_loss_before_commit_leaves_the_source_free_to_resume() -> None:
    source, target = drive(State.LOADED)
    assert feed(source, b"") == [ConnectionClosed(clean=False)]
    assert source.state is State.LOADED  # Commit never left: the VM is still the source's


def test_loss_after_commit_is_in_doubt_then_resolved_by_query() -> None:
    source, target = drive(State.LOADED)
    commit = source.send(Commit())  # the VM now belongs to the target
    assert source.state is State.COMMITTED
    assert feed(source, b"") == [ConnectionClosed(clean=False)]  # link lost before Running
    with pytest.raises(LocalProtocolError, match="Abort after Commit"):
        source.send(Abort("resume?"))
    feed(target, commit)
    assert target.state is State.COMMITTED

    Answer = Literal["running", "aborted", "unknown"]
    answers: tuple[Answer, ...] = ("running", "aborted", "unknown")
    for answer in answers:
        source2, target2 = make_pair()
        handshake(source2, target2)
        assert transfer(source2, target2, Query(MIGRATION_ID)) == [Query(MIGRATION_ID)]
        result = QueryResult(MIGRATION_ID, answer)
        assert transfer(target2, source2, result) == [result]
        assert source2.state is target2.state is State.ANSWERED
        transfer(source2, target2, Close())
        transfer(target2, source2, Close())
        assert feed(source2, b"") == [ConnectionClosed(clean=True)]


def test_query_flow_rules() -> None:
    source, target = drive(State.READY)
    transfer(source, target, Query(MIGRATION_ID))
    with pytest.raises(LocalProtocolError, match="QueryResult.migration_id 'x' does not answer"):
        target.send(QueryResult("x", "unknown"))
    with pytest.raises(LocalProtocolError, match="Abort not allowed"):
        target.send(Abort("no"))
    with pytest.raises(LocalProtocolError, match="QueryResult not allowed"):
        source.send(QueryResult(MIGRATION_ID, "unknown"))
    transfer(target, source, QueryResult(MIGRATION_ID, "unknown"))
    with pytest.raises(LocalProtocolError, match="VmDescription not allowed"):
        source.send(description())
