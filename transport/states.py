"""Every state transition of the migration protocol, as tables. Nothing else changes `state`.

Rules of this file:

1. One conversation state per connection, driven by the events both sides send, in the order
   this side sees them (what it sends, what it receives). Both sides walk the same table.
2. TRANSITIONS[state][(sender, event type)] is the next state. A pair missing from the table is a
   protocol error: LocalProtocolError when this side tries to send it, RemoteProtocolError (and
   ERROR for good) when the peer sent it.
3. The only events both sides may send at the same time are the target's Progress (a self-loop
   wherever the source may still send, so any interleaving lands in the same state), Abort
   (rule 6) and Close. Everything else is lock-step: one side speaks, the other answers.
4. HELLO first, source first. After both HELLOs the PSK step (AUTH_SOURCE, AUTH_TARGET) runs only
   when the negotiated auth is "psk"; with "tls" (the edge already did mutual TLS) or "none"
   (both operators allowed unauthenticated peers) it is skipped: SKIP_WITHOUT_PSK. No VM data
   event exists before READY (DESIGN section 6). One exception saves the setup a round trip:
   the source may send its VmDescription right behind its own Auth (DESCRIBED_EARLY), before
   the target's Auth. It is sealed under the source's key, so only a holder of the key reads
   it; the target reads it only after it checked the source's Auth; and the source acts on
   nothing from the target (its Accept or Abort) before the target's Auth proved the key.
5. Cutover, DESIGN section 5: either side may abort until the target sent Loaded; then only the
   source may abort, until it sent Commit. After Commit nobody aborts: the target resumes and
   answers Running. A link lost after Commit leaves the source in doubt, resolved on a new
   connection with Query / QueryResult, never by resuming blindly.
6. Abort crossing messages in flight: the side that sent Abort may still receive what the peer
   sent before it saw that Abort. `in_flight_after_abort` derives that set from this table: every
   event the peer could send from the states this side passed through since the peer's last
   event, following the peer's own transitions. Those events are checked like any other and then
   dropped, except a crossing Abort, which is delivered.
7. EOF is clean only where the conversation had ended: CLEAN_EOF, or after the peer's Close.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Final

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
)


class Role(enum.Enum):
    SOURCE = "source"
    TARGET = "target"

    @property
    def peer(self) -> Role:
        return Role.TARGET if self is Role.SOURCE else Role.SOURCE


class State(enum.Enum):
    START = "START"  # nothing yet; the source speaks first
    HELLO = "HELLO"  # the source's Hello is out; the target answers with its own
    AUTH_SOURCE = "AUTH_SOURCE"  # psk: waiting for the source's Auth
    AUTH_TARGET = "AUTH_TARGET"  # psk: the source proved the key; waiting for the target's
    DESCRIBED_EARLY = "DESCRIBED_EARLY"  # psk: the description followed the source's Auth (rule 4)
    READY = "READY"  # authenticated: VmDescription or Query may come
    DESCRIBED = "DESCRIBED"  # the target decides: Accept or Abort
    PAGES = "PAGES"  # bulk copy and dirty rounds
    DEVICE_STATE = "DEVICE_STATE"  # vCPU and device state after the last pages (DESIGN R6.5)
    LOADING = "LOADING"  # Done is out; the target loads and verifies
    LOADED = "LOADED"  # the target waits for Commit; only the source may abort
    COMMITTED = "COMMITTED"  # the VM belongs to the target; nobody aborts
    DONE = "DONE"  # Running: the migration succeeded
    QUERIED = "QUERIED"  # in-doubt resolution: the target answers
    ANSWERED = "ANSWERED"  # QueryResult given
    ABORTED = "ABORTED"  # one side aborted; only Close follows
    SOURCE_CLOSED = "SOURCE_CLOSED"  # the source sent Close
    TARGET_CLOSED = "TARGET_CLOSED"  # the target sent Close
    CLOSED = "CLOSED"  # both did
    ERROR = "ERROR"  # the peer broke the protocol; the connection is useless


S: Final = Role.SOURCE
T: Final = Role.TARGET

Key = tuple[Role, type[Event]]

_ABORT_BOTH: Final[dict[Key, State]] = {(S, Abort): State.ABORTED, (T, Abort): State.ABORTED}
_CLOSE_EITHER: Final[dict[Key, State]] = {
    (S, Close): State.SOURCE_CLOSED,
    (T, Close): State.TARGET_CLOSED,
}

TRANSITIONS: Final[Mapping[State, Mapping[Key, State]]] = {
    # --- handshake: authenticate before any VM data (DESIGN 6) ---
    State.START: {(S, Hello): State.HELLO},
    State.HELLO: {(T, Hello): State.AUTH_SOURCE},  # -> READY unless psk: SKIP_WITHOUT_PSK
    State.AUTH_SOURCE: {(S, Auth): State.AUTH_TARGET},
    State.AUTH_TARGET: {(T, Auth): State.READY, (S, VmDescription): State.DESCRIBED_EARLY},
    State.DESCRIBED_EARLY: {(T, Auth): State.DESCRIBED},
    State.READY: {
        (S, VmDescription): State.DESCRIBED,
        (S, Query): State.QUERIED,
        **_ABORT_BOTH,
    },
    # --- setup: can the target host this layout? ---
    State.DESCRIBED: {(T, Accept): State.PAGES, **_ABORT_BOTH},
    # --- bulk copy, dirty rounds, then state (pages never follow device state: DESIGN R9) ---
    State.PAGES: {
        (S, PageBatch): State.PAGES,
        (S, DeviceState): State.DEVICE_STATE,
        (S, Done): State.LOADING,
        (T, Progress): State.PAGES,
        **_ABORT_BOTH,
    },
    State.DEVICE_STATE: {
        (S, DeviceState): State.DEVICE_STATE,
        (S, Done): State.LOADING,
        (T, Progress): State.DEVICE_STATE,
        **_ABORT_BOTH,
    },
    # --- cutover (DESIGN 5) ---
    State.LOADING: {(T, Loaded): State.LOADED, (T, Progress): State.LOADING, **_ABORT_BOTH},
    State.LOADED: {(S, Commit): State.COMMITTED, (S, Abort): State.ABORTED},  # target: no abort
    State.COMMITTED: {(T, Running): State.DONE},  # nobody aborts after Commit
    State.DONE: {**_CLOSE_EITHER},
    # --- in-doubt resolution, on a new connection ---
    State.QUERIED: {(T, QueryResult): State.ANSWERED},
    State.ANSWERED: {**_CLOSE_EITHER},
    # --- endings ---
    State.ABORTED: {**_CLOSE_EITHER},
    State.SOURCE_CLOSED: {(T, Close): State.CLOSED},
    State.TARGET_CLOSED: {(S, Close): State.CLOSED},
    State.CLOSED: {},
    State.ERROR: {},
}

SKIP_WITHOUT_PSK: Final[Mapping[State, State]] = {State.AUTH_SOURCE: State.READY}
"""Rule 4: where the table leads after the target's Hello when the negotiated auth is not psk."""

CLEAN_EOF: Final[frozenset[State]] = frozenset({State.DONE, State.ANSWERED, State.CLOSED})
"""Rule 7: EOF here ends a finished conversation; the peer's X_CLOSED state is clean too."""

PEER_CLOSED: Final[Mapping[Role, State]] = {S: State.SOURCE_CLOSED, T: State.TARGET_CLOSED}

BEFORE_AUTH: Final[frozenset[State]] = frozenset(
    {State.START, State.HELLO, State.AUTH_SOURCE, State.AUTH_TARGET, State.DESCRIBED_EARLY}
)
BEFORE_ACCEPT: Final[frozenset[State]] = frozenset({*BEFORE_AUTH, State.READY, State.DESCRIBED})


def next_state(state: State, sender: Role, event_type: type[Event], *, psk: bool) -> State | None:
    """The state after `sender` sends `event_type` in `state`, or None if that is not allowed."""
    following = TRANSITIONS[state].get((sender, event_type))
    if following is not None and not psk:
        following = SKIP_WITHOUT_PSK.get(following, following)
    return following


def allowed(state: State, sender: Role) -> list[str]:
    """Names of the events `sender` may send in `state`, for error messages."""
    return sorted(event.__name__ for role, event in TRANSITIONS[state] if role is sender)


def eof_is_clean(state: State, peer: Role) -> bool:
    return state in CLEAN_EOF or state is PEER_CLOSED[peer]


def in_flight_after_abort(since: Iterable[State], peer: Role) -> frozenset[type[Event]]:
    """Rule 6: what the peer may have sent before it saw this side's Abort.

    `since` are the states this side was in since the peer's last event: the peer was in one of
    them, and may have moved on by its own transitions only (it needs ours for the others).
    """
    seen: set[State] = set()
    todo = list(since)
    events: set[type[Event]] = set()
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        for (role, event), following in TRANSITIONS[state].items():
            if role is not peer or event is Close:
                continue
            events.add(event)
            if following is not State.ABORTED:
                todo.append(following)
    return frozenset(events)


def explain(state: State, sender: Role, event_type: type[Event]) -> str:
    """Why `sender` may not send `event_type` in `state`: the rule, then what is allowed."""
    name = event_type.__name__
    if state is State.ERROR:
        return f"{name} in state ERROR: an earlier protocol error ended this connection"
    if state in BEFORE_AUTH and event_type in (VmDescription, PageBatch, DeviceState, Done, Query):
        why = f"{name} before authentication completed"
    elif state in BEFORE_ACCEPT and event_type in (PageBatch, DeviceState, Done):
        why = f"page data ({name}) before Accept"
    elif event_type is Abort and sender is S and state in (State.COMMITTED, State.DONE):
        why = "Abort after Commit: the VM belongs to the target now"
    elif event_type is Abort and sender is T and state in (State.LOADED, State.COMMITTED):
        why = "Abort after Loaded: the target waits for Commit and may not abort (DESIGN 5)"
    elif event_type is PageBatch and state is State.DEVICE_STATE:
        why = "PageBatch after DeviceState: all memory comes before device state (DESIGN R9)"
    else:
        why = f"{name} not allowed"
    may = ", ".join(allowed(state, sender)) or "nothing"
    return f"{why} (state {state.value}; {sender.value} may send: {may})"
