"""Sealed records after a psk handshake (transport/seal.py, DESIGN section 6): every frame of both
directions is authenticated, so any change to the stream ends the connection as the peer's fault.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tr_helpers import (
    KEY,
    PAGE,
    Frames,
    batch,
    description,
    drain,
    drive,
    encoded,
    feed,
    raw_frame,
    split_frames,
    transfer,
)

from transport import (
    NEED_DATA,
    Accept,
    Connection,
    Done,
    Loaded,
    LocalProtocolError,
    PageBatch,
    Progress,
    RemoteProtocolError,
    Role,
    State,
    seal,
)

TAG_FAILURE = r"sealed record \d+ failed authentication"


def records(data: bytes) -> list[bytes]:
    """A sealed stream cut into its records, by their length bytes."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = seal.LENGTH.unpack_from(data, pos)
        out.append(data[pos : pos + seal.LENGTH.size + length])
        pos += seal.LENGTH.size + length
    assert pos == len(data)
    return out


def refused(conn: Connection, data: bytes, match: str = TAG_FAILURE) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        feed(conn, data)
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        conn.next_event()


def in_pages() -> tuple[Connection, Connection]:
    source, target = drive(State.PAGES)
    assert source.sealed and target.sealed
    return source, target


def test_both_directions_are_sealed_from_ready_on_and_page_data_never_travels_in_the_clear() -> None:
    source, target = drive(State.AUTH_TARGET)
    assert source.sealer is not None and target.sealer is None and not source.sealed
    source, target = in_pages()
    sent = batch(0, [1, 2])
    wire = source.send(sent)
    assert bytes(sent.data[:PAGE]) not in wire and b"page_batch" not in wire
    assert len(records(wire)) == 1  # one record for the whole batch, not one per page
    [got] = feed(target, wire)
    assert isinstance(got, PageBatch) and bytes(got.data) == bytes(sent.data)
    assert b"progress" not in target.send(Progress(1, 2, 0))


@pytest.mark.parametrize("where", ["length", "header", "page data", "tag"])
def test_a_flipped_bit_anywhere_in_a_record_ends_the_connection(where: str) -> None:
    source, target = in_pages()
    wire = bytearray(source.send(batch(0, [1, 2])))
    offset = {"length": 3, "header": 10, "page data": len(wire) - 100, "tag": len(wire) - 1}[where]
    wire[offset] ^= 0x01
    # A changed length makes the record one byte longer or shorter: either way it is refused.
    refused(target, bytes(wire) + bytes(64), TAG_FAILURE if where != "length" else r"sealed record 1 ")


def test_a_dropped_record_ends_the_connection() -> None:
    source, target = in_pages()
    source.send(batch(0, [1]))
    refused(target, source.send(batch(0, [2])))


def test_a_replayed_record_ends_the_connection() -> None:
    source, target = in_pages()
    first = source.send(batch(0, [1]))
    assert len(feed(target, first)) == 1
    refused(target, first)


def test_reordered_records_end_the_connection() -> None:
    source, target = in_pages()
    first, second = source.send(batch(0, [1])), source.send(batch(0, [2]))
    refused(target, second + first)


def test_an_injected_frame_in_the_clear_ends_the_connection() -> None:
    source, target = in_pages()
    refused(target, bytes(encoded(batch(0, [1]))), r"sealed record 1 ")


def test_a_record_reflected_back_to_its_sender_does_not_open() -> None:
    source, target = in_pages()
    refused(source, source.send(batch(0, [1])))


def test_a_record_from_another_connection_with_the_same_key_does_not_open() -> None:
    """Keys come from both Hello nonces: a recording of yesterday's migration opens nothing."""
    old_source, _ = in_pages()
    _, target = in_pages()
    refused(target, old_source.send(batch(0, [1])))


def test_a_rewritten_done_does_not_open() -> None:
    """What the proxy of issue 10 did: Done rewritten (here its digest, to one of the same length).
    Without the key, a rewrite is a change of ciphertext bytes (GCM is a stream cipher
    underneath: XOR the ciphertext with old ^ new plaintext), which the tag catches."""
    source, target = in_pages()
    honest = Done(0, b"\x01" * 32, "full")
    wire = bytearray(source.send(honest))
    plain, forged = bytes(encoded(honest)), bytes(encoded(Done(0, b"\x02" * 32, "full")))
    assert len(plain) == len(forged)
    for i, (a, b) in enumerate(zip(plain, forged)):
        wire[seal.LENGTH.size + i] ^= a ^ b
    refused(target, bytes(wire))


def test_a_record_longer_than_the_largest_frame_is_refused_on_its_length_alone() -> None:
    source, target = in_pages()
    refused(target, struct.pack(">I", 0xFFFF_FFFF), r"sealed record 1 of 4294967295 bytes exceeds the largest frame")
    _, target = in_pages()
    refused(target, struct.pack(">I", 5) + bytes(5), r"sealed record 1 of 5 bytes: shorter than its tag")


def test_a_record_holds_exactly_one_frame() -> None:
    source, target = in_pages()
    sealer = source.sealer
    assert sealer is not None
    two = bytes(encoded(Progress(0, 0, 0)))
    joined = b"".join(bytes(part) for part in sealer.seal([bytes(encoded(batch(0, [1]))) + two]))
    refused(target, joined, r"a record carries exactly one frame")


@pytest.mark.parametrize("cut", [2, 4, 40, 5000])
def test_eof_inside_a_record(cut: int) -> None:
    source, target = in_pages()
    wire = source.send(batch(0, [1, 2]))
    target.receive_data(wire[:cut])
    assert drain(target) == []
    refused(target, b"", rf"connection closed mid-record \({cut} bytes of an unfinished sealed record\)")


def test_sealed_page_data_is_read_into_the_record_and_opened_once() -> None:
    """recv_into goes straight into the record's buffer; the event's data is the opened frame."""
    source = Connection(Role.SOURCE, node="a", psk=KEY)
    target = Connection(Role.TARGET, node="b", psk=KEY, reuse_page_buffer=True)
    transfer(source, target, source.make_hello())
    transfer(target, source, target.make_hello())
    transfer(source, target, source.make_auth())
    transfer(target, source, target.make_auth())
    transfer(source, target, description())
    transfer(target, source, Accept())
    sent = batch(0, [3, 4, 5], [6])
    wire = source.send(sent)
    target.receive_data(wire[:100])
    assert target.next_event() is NEED_DATA  # the record is incomplete
    lent = target.get_receive_buffer(1 << 20)
    assert len(lent) == len(wire) - 100  # exactly the rest of this record
    lent[:] = wire[100:]
    target.receive_buffer_updated(len(lent))
    got = target.next_event()
    assert isinstance(got, PageBatch)
    assert bytes(got.data) == bytes(sent.data)
    assert list(got.pages) == [3, 4, 5] and list(got.zero_pages) == [6]


def test_hand_built_frames_are_checked_after_opening_like_any_other() -> None:
    """A peer that knows the key and breaks the rules is refused by the frame checks."""
    source, target = in_pages()
    header = {"t": "page_batch", "slot": 0, "round": 0, "n_pages": 1, "n_zero": 0}
    refused(target, raw_frame(header, np.array([64], "<u8").tobytes() + bytes(PAGE)), r"page index 64 outside slot 0")


def test_the_loaded_digest_comes_only_from_an_opened_record() -> None:
    source, target = in_pages()
    transfer(source, target, Done(0, b"\x01" * 32, "full"))
    forged = Frames(encoded(Loaded(b"\x01" * 32)))
    refused(source, bytes(forged))  # in the clear, as a man in the middle would inject it


def test_split_frames_helper_sees_frame_boundaries() -> None:
    frames = encoded(Progress(0, 0, 0)) + encoded(Progress(1, 1, 1))
    assert isinstance(frames, Frames) and len(split_frames(frames)) == 2


def test_keys_differ_per_direction_and_per_connection() -> None:
    a, b = b"a" * 32, b"b" * 32
    forward = seal.derive_key(KEY, a, b, Role.SOURCE)
    assert forward != seal.derive_key(KEY, a, b, Role.TARGET)
    assert forward != seal.derive_key(KEY, b, a, Role.SOURCE)
    assert forward != seal.derive_key(b"x" * 32, a, b, Role.SOURCE)
    assert len(forward) == seal.KEY_BYTES


@pytest.mark.parametrize("mode", [{"tls": True}, {"allow_unauthenticated": True}])
def test_without_a_psk_nothing_is_sealed(mode: dict[str, bool]) -> None:
    """tls: the edge's TLS already protects every byte; none: the operator's test-only switch."""
    source, target = drive(State.PAGES, **mode)
    assert source.sealer is None and target.sealer is None and not source.sealed
    [got] = feed(target, bytes(encoded(batch(0, [1]))))
    assert isinstance(got, PageBatch)


@pytest.mark.parametrize("extra", [-1, 0, 1, 4096])
def test_records_either_side_of_the_small_record_size_open_alike(extra: int) -> None:
    """A small frame is sealed in one AEAD call from a copy, a larger one streamed from its
    buffers: the same record format either way, opened by the same Opener, in sequence, and a
    changed byte fails either."""
    key = b"k" * 32
    sealer = seal.Sealer(key)
    opener = seal.Opener(key, 1 << 20)
    size = seal.SMALL_RECORD_BYTES - seal.TAG_BYTES + extra
    rng = np.random.default_rng(size)
    frames = []
    for _ in range(2):
        body = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        parts = [body[:100], memoryview(body)[100:]]  # a header and a payload, as sent
        record = b"".join(bytes(p) for p in sealer.seal(parts))
        assert seal.LENGTH.unpack_from(record)[0] == size + seal.TAG_BYTES == len(record) - seal.LENGTH.size
        opener.feed(memoryview(record))
        opened = opener.next_frame()
        assert opened is not None and bytes(opened) == body
        frames.append(record)
    bad = bytearray(frames[0])
    bad[seal.LENGTH.size + size // 2] ^= 1
    fresh = seal.Opener(key, 1 << 20)
    fresh.feed(memoryview(bytes(bad)))
    with pytest.raises(LocalProtocolError, match="failed authentication"):
        fresh.next_frame()
