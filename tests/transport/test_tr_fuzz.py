"""Mutated streams, seeded: whatever the peer sends, the only failure is RemoteProtocolError, and
a batch that gets through lies inside guest memory.

Frames after the handshake are mutated in the clear (tls mode: the edge's TLS protects them), so
the mutations reach the frame decoder; with a psk the same frames travel sealed, and there every
mutation must fail (test_every_mutation_of_a_sealed_stream_is_caught)."""

from __future__ import annotations

import random

import pytest
from tr_helpers import (
    MIGRATION_ID,
    SLOT0_PAGES,
    SLOT1_PAGES,
    batch,
    description,
    drive,
    encoded,
    raw_frame,
    sealed_by,
)

from transport import (
    NEED_DATA,
    Abort,
    Connection,
    DeviceState,
    Done,
    Loaded,
    PageBatch,
    Progress,
    Query,
    RemoteProtocolError,
    State,
)

LIMITS = {0: SLOT0_PAGES, 1: SLOT1_PAGES}


def streams() -> dict[str, tuple[State, int, bytes]]:
    """name -> (state both sides start in, which side is fed: 0 source, 1 target, valid bytes)."""
    hello = raw_frame(
        {
            "t": "hello",
            "version_min": 2,
            "version_max": 2,
            "node": "x",
            "nonce": b"n" * 32,
            "auth": "psk",
            "capabilities": ["a"],
            "max_batch_bytes": 8 << 20,
        }
    )
    return {
        "hello": (State.START, 1, hello),
        "describe": (State.READY, 1, encoded(description()) + encoded(Query(MIGRATION_ID))),
        "pages": (
            State.PAGES,
            1,
            b"".join(
                [
                    encoded(batch(0, [1, 2, 63], [0, 5])),
                    encoded(batch(1, [15], [])),
                    encoded(DeviceState("vcpu0", b"\x00" * 50)),
                    encoded(Done(6, b"d" * 32, "full")),
                ]
            ),
        ),
        "cutover": (State.LOADING, 0, encoded(Progress(1, 2, 3)) + encoded(Loaded(b"d" * 32)) + encoded(Abort("x"))),
    }


def mutate(rng: random.Random, data: bytes) -> bytes:
    """`data` changed in 1-4 places; never returned unchanged (a byte set to the value it
    already held is no mutation, and a sealed stream must only reject real changes)."""
    while (out := _mutate_once(rng, data)) == data:
        pass
    return out


def _mutate_once(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        at = rng.randrange(len(out))
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xD9, 0xDC, 0xDE, 0xC4])
        elif kind == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 3:
            del out[at : at + rng.randint(1, 16)]
        else:
            out[at : at + 4] = rng.randrange(1 << 32).to_bytes(4, "big")
        if not out:
            out = bytearray(b"\x00")
    return bytes(out)


def feed_chunks(rng: random.Random, conn: Connection, data: bytes) -> None:
    offset = 0
    while offset < len(data):
        step = rng.choice([1, 3, 64, 4096, len(data)])
        conn.receive_data(data[offset : offset + step])
        offset += step
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, PageBatch):
                limit = LIMITS[event.slot]
                assert all(int(a.max(initial=0)) < limit for a in (event.pages, event.zero_pages))
                assert len(event.data) == event.pages.size * 4096
    conn.receive_data(b"")
    conn.next_event()


@pytest.mark.parametrize("name", sorted(streams()))
def test_mutated_streams_fail_only_as_protocol_errors(name: str) -> None:
    state, index, data = streams()[name]
    rng = random.Random(name)
    errors = 0
    for _ in range(300):
        conn = drive(state)[index] if state is State.START else drive(state, tls=True)[index]
        try:
            feed_chunks(rng, conn, mutate(rng, data))
        except RemoteProtocolError as exc:
            errors += 1
            assert conn.state is State.ERROR and str(exc)
    assert errors > 150  # most mutations must be caught, not silently accepted


@pytest.mark.parametrize("name", sorted(set(streams()) - {"hello"}))
def test_every_mutation_of_a_sealed_stream_is_caught(name: str) -> None:
    state, index, data = streams()[name]
    rng = random.Random(name)
    for _ in range(100):
        pair = drive(state)
        conn = pair[index]
        wire = sealed_by(pair[1 - index], data)
        with pytest.raises(RemoteProtocolError):
            feed_chunks(rng, conn, mutate(rng, wire))
        assert conn.state is State.ERROR
