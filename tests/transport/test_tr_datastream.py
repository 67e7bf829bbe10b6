"""Data streams (transport/datastream.py), sans-IO: a sender and a receiver back to back in memory,
and every way a hostile or broken peer could bend the bytes in between."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import numpy as np
import pytest

from transport import NEED_DATA, PageBatch, RemoteProtocolError
from transport.datastream import (
    DataHello,
    DataReceiver,
    DataSender,
    Layout,
    StreamEnd,
    decode_hello,
    hello_size,
    stream_secret,
)
from transport.errors import LocalProtocolError
from transport.framing import PREFIX

PAGE = 4096
LAYOUT = Layout({0: 1024, 3: 16}, PAGE, 1 << 20)
SECRET = stream_secret(b"k" * 32, b"s" * 32, b"t" * 32)


def batch(slot: int, pages: list[int], zero: list[int] = (), fill: int | None = None) -> PageBatch:  # type: ignore[assignment]
    data = np.zeros((len(pages), PAGE), np.uint8)
    for row, page in enumerate(pages):
        data[row] = (page * 7 + 1) % 251 if fill is None else fill
    return PageBatch(
        slot=slot,
        round=1,
        pages=np.array(pages, np.uint64),
        zero_pages=np.array(list(zero), np.uint64),
        data=data.reshape(-1).data,
    )


def wire(sender: DataSender, *events: PageBatch | None) -> list[bytes]:
    """Each event's bytes (None: the end marker), one entry per frame or record."""
    out = []
    for event in events:
        buffers = sender.end() if event is None else sender.batch(event)
        out.append(b"".join(bytes(memoryview(b).cast("B")) for b in buffers))
    return out


def pump(receiver: DataReceiver, data: bytes, eof: bool = False) -> list[Any]:
    """Feed `data` as the edge would (exactly what receive_buffer asks), collect the events."""
    events: list[Any] = []
    position = 0

    def drain() -> None:
        while (event := receiver.next_event()) is not NEED_DATA:
            if isinstance(event, PageBatch):
                events.append((event.slot, event.pages.tolist(), event.zero_pages.tolist(), bytes(event.data)))
            else:
                events.append(event)

    while position < len(data):
        buffer = receiver.receive_buffer()
        take = min(buffer.nbytes, len(data) - position)
        buffer[:take] = data[position : position + take]
        receiver.received(take)
        position += take
        drain()
    if eof:
        receiver.received(0)
        drain()
    return events


@pytest.fixture(params=[True, False], ids=["sealed", "clear"])
def sealed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def pair(sealed: bool, index: int = 0) -> tuple[DataSender, DataReceiver]:
    return DataSender(SECRET, index, LAYOUT, sealed=sealed), DataReceiver(SECRET, index, LAYOUT, sealed=sealed)


def test_batches_and_end_marker_arrive_as_sent(sealed: bool) -> None:
    sender, receiver = pair(sealed)
    first, second = batch(0, [5, 6, 7], zero=[9]), batch(3, [15], fill=0xAB)
    events = pump(receiver, b"".join(wire(sender, first, second, None)), eof=True)
    assert events[0] == (0, [5, 6, 7], [9], bytes(first.data))
    assert events[1] == (3, [15], [], bytes(second.data))
    assert events[2] == StreamEnd(batches=2, pages=5)
    assert receiver.ended


def test_sealed_stream_hides_the_pages() -> None:
    sender, _ = pair(True)
    (record,) = wire(sender, batch(0, [1], fill=0x5A))
    assert bytes([0x5A]) * 64 not in record


# --- hello ----------------------------------------------------------------------------------


def test_hello_round_trip_and_token() -> None:
    hello = DataHello.make(SECRET, "m-1-abc", 1, 2)
    raw = hello.encode()
    assert hello_size(raw[:2]) == len(raw)
    decoded = decode_hello(raw)
    assert decoded == hello
    decoded.check_token(SECRET)


@pytest.mark.parametrize(
    "change",
    ["other session", "other index", "other migration", "other count"],
)
def test_hello_token_binds_session_index_and_migration(change: str) -> None:
    secret = SECRET
    hello = DataHello.make(secret, "m-1-abc", 1, 2)
    if change == "other session":
        forged = DataHello.make(stream_secret(b"k" * 32, os.urandom(32), b"t" * 32), "m-1-abc", 1, 2)
    elif change == "other index":
        forged = DataHello("m-1-abc", 0, 2, hello.token)
    elif change == "other migration":
        forged = DataHello("m-1-abd", 1, 2, hello.token)
    else:
        forged = DataHello("m-1-abc", 1, 3, hello.token)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        decode_hello(forged.encode()).check_token(secret)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\x00\x00", "migration id length 0"),
        (b"\xff\xff", "migration id length 65535"),
        (b"\x00\x02\xff\xfe" + b"\x00\x00\x00\x01" + bytes(32), "hello"),  # not UTF-8
        (b"\x00\x02m1" + b"\x00\x02\x00\x02" + bytes(32), "index 2 outside"),
        (b"\x00\x02m1" + b"\x00\x00\x00\x00" + bytes(32), "count 0"),
        (b"\x00\x02m1" + b"\x00\x00\x00\x11" + bytes(32), "count 17"),
        (b"\x00\x02m\n" + b"\x00\x00\x00\x01" + bytes(32), "control characters"),
    ],
)
def test_malformed_hello_is_refused(raw: bytes, words: str) -> None:
    with pytest.raises(RemoteProtocolError, match=words):
        decode_hello(raw)


# --- frames checked against the layout -------------------------------------------------------


def forged_batch(slot: int, pages: list[int], zero: list[int], data_pages: int | None = None) -> bytes:
    """A page-batch frame built by hand, as a hostile source could send it (clear)."""
    count = len(pages) if data_pages is None else data_pages
    header = msgpack.packb(
        {"t": "page_batch", "slot": slot, "round": 1, "n_pages": len(pages), "n_zero": len(zero)}, use_bin_type=True
    )
    payload = np.array(pages + zero, "<u8").tobytes() + bytes(count * PAGE)
    return PREFIX.pack(len(header), len(payload)) + header + payload


def frame_of(header: dict[str, Any], payload: bytes = b"") -> bytes:
    body = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(len(body), len(payload)) + body + payload


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (forged_batch(0, [1024], []), "page index 1024 outside slot 0"),
        (forged_batch(3, [1], [16]), "zero page index 16 outside slot 3"),
        (forged_batch(7, [1], []), "unknown slot 7"),
        (forged_batch(0, [1, 2], [], data_pages=1), "payload length"),
        (forged_batch(0, [], []), "both 0"),
        (frame_of({"t": "done", "pages_total": 0, "digest": None, "verify": "off"}), "unknown message type 'done'"),
        (frame_of({"t": "stream_end", "batches": 1, "pages": 1}), "end marker counts 1 batches"),
        (frame_of({"t": "stream_end", "batches": 0, "pages": 0}, b"x"), "StreamEnd with a payload"),
        (PREFIX.pack(10, 2 << 20), "exceeds the largest a data stream allows"),
    ],
)
def test_hostile_clear_frames_are_refused_for_good(data: bytes, words: str) -> None:
    _, receiver = pair(False)
    with pytest.raises(RemoteProtocolError, match=words):
        pump(receiver, data)
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        receiver.next_event()


def test_sender_refuses_a_batch_outside_the_layout() -> None:
    sender, _ = pair(True)
    with pytest.raises(LocalProtocolError, match="outside slot 3"):
        sender.batch(batch(3, [16]))
    with pytest.raises(LocalProtocolError, match="unknown slot 1"):
        sender.batch(batch(1, [0]))


def test_nothing_after_the_end_marker(sealed: bool) -> None:
    sender, receiver = pair(sealed)
    data = b"".join(wire(sender, batch(0, [1]), None))
    pump(receiver, data)
    extra = DataSender(SECRET, 0, LAYOUT, sealed=sealed)
    late = b"".join(wire(extra, batch(0, [1])))
    if not sealed:
        with pytest.raises(RemoteProtocolError, match="after the end marker"):
            pump(receiver, late)
    else:
        with pytest.raises(RemoteProtocolError):
            pump(receiver, late)  # sequence 0 again under this stream's key: fails its tag
    with pytest.raises(LocalProtocolError):
        sender.batch(batch(0, [2]))


def test_eof_before_the_end_marker_is_an_error(sealed: bool) -> None:
    sender, receiver = pair(sealed)
    with pytest.raises(RemoteProtocolError, match="closed before its end marker"):
        pump(receiver, b"".join(wire(sender, batch(0, [1]))), eof=True)


def test_eof_mid_frame_is_an_error(sealed: bool) -> None:
    sender, receiver = pair(sealed)
    data = b"".join(wire(sender, batch(0, [1])))
    with pytest.raises(RemoteProtocolError, match="closed mid-"):
        pump(receiver, data[:-5], eof=True)


# --- sealed records: changed, dropped, reordered, replayed, injected, moved between streams ----


def records(count: int, index: int = 0) -> list[bytes]:
    sender = DataSender(SECRET, index, LAYOUT, sealed=True)
    return wire(sender, *(batch(0, [page]) for page in range(count)))


@pytest.mark.parametrize("attack", ["changed", "dropped", "reordered", "replayed", "injected", "other stream"])
def test_tampered_records_end_the_stream(attack: str) -> None:
    ours = records(3)
    if attack == "changed":
        record = bytearray(ours[1])
        record[100] ^= 1
        stream = [ours[0], bytes(record), ours[2]]
    elif attack == "dropped":
        stream = [ours[0], ours[2]]
    elif attack == "reordered":
        stream = [ours[0], ours[2], ours[1]]
    elif attack == "replayed":
        stream = [ours[0], ours[1], ours[1]]
    elif attack == "injected":
        stream = [ours[0], forged_batch(0, [5], []), ours[1]]
    else:
        stream = [ours[0], records(2, index=1)[1]]
    _, receiver = pair(True)
    with pytest.raises(RemoteProtocolError):
        pump(receiver, b"".join(stream))
    # What arrived before the bad record was delivered; nothing after it.
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        receiver.next_event()


def test_records_of_changing_sizes_open_in_place_one_after_another() -> None:
    """Each record is opened where it was received (one buffer, grown for the largest): a large
    record, a small one and a large one again each give exactly their own pages, and a record that
    fails its tag after them still ends the stream with nothing of it handed out."""
    sender, receiver = pair(True)
    sent = [batch(0, list(range(40, 80))), batch(3, [2], fill=0x11), batch(0, list(range(100, 164)), fill=0x77)]
    good = wire(sender, *sent)
    bad = bytearray(wire(sender, batch(0, [7], fill=0x22))[0])
    bad[-1] ^= 1  # the tag
    events = pump(receiver, b"".join(good))
    assert [(slot, pages, data) for slot, pages, _, data in events] == [
        (b.slot, b.pages.tolist(), bytes(b.data)) for b in sent
    ]
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        pump(receiver, bytes(bad))
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        receiver.next_event()


def test_a_batch_with_its_data_in_parts_is_the_same_frame_and_record(sealed: bool) -> None:
    """Runs of pages given as separate buffers (straight from guest RAM) make exactly the bytes
    of the same batch with its data in one buffer: same frame, same record."""
    whole = batch(0, [3, 4, 10, 11, 12])
    data = bytes(whole.data)
    parts = [data[: 2 * PAGE], b"", data[2 * PAGE :]]
    split = PageBatch(slot=0, round=1, pages=whole.pages, zero_pages=whole.zero_pages, data=b"")
    one, _ = pair(sealed)
    many, receiver = pair(sealed)
    joined = b"".join(bytes(memoryview(b).cast("B")) for b in one.batch(whole))
    assert b"".join(bytes(memoryview(b).cast("B")) for b in many.batch(split, parts)) == joined
    assert pump(receiver, joined) == [(0, [3, 4, 10, 11, 12], [], data)]


def test_data_in_parts_must_match_the_pages_and_not_come_twice() -> None:
    sender, _ = pair(True)
    pages = np.array([1, 2], np.uint64)
    empty = np.empty(0, np.uint64)
    with pytest.raises(LocalProtocolError, match=r"PageBatch.data is 4096 bytes; 2 pages"):
        sender.batch(PageBatch(slot=0, round=1, pages=pages, zero_pages=empty, data=b""), [bytes(PAGE)])
    with pytest.raises(LocalProtocolError, match="given twice"):
        sender.batch(PageBatch(slot=0, round=1, pages=pages, zero_pages=empty, data=bytes(2 * PAGE)), [b"x"])
    assert sender.batches == 0  # nothing was counted (or sealed) for a refused batch


@pytest.mark.parametrize("attack", ["changed", "truncated", "replayed"])
def test_a_record_of_a_batch_in_parts_is_checked_like_any_other(attack: str) -> None:
    sender, receiver = pair(True)
    parts = [bytes([1]) * PAGE, bytes([2]) * PAGE]
    split = PageBatch(slot=0, round=1, pages=np.array([8, 20], np.uint64), zero_pages=np.empty(0, np.uint64), data=b"")
    record = b"".join(bytes(memoryview(b).cast("B")) for b in sender.batch(split, parts))
    if attack == "changed":
        stream, eof = record[:-PAGE] + bytes([record[-PAGE] ^ 4]) + record[-PAGE + 1 :], False
    elif attack == "truncated":
        stream, eof = record[:-1], True
    else:
        stream, eof = record + record, False
    with pytest.raises(RemoteProtocolError):  # a replay: the first copy opens, the second must not
        pump(receiver, stream, eof=eof)
