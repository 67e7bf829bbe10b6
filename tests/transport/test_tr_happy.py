"""A whole migration between two Connections in memory, fed in every way the edge may feed."""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import pytest
from tr_helpers import (
    KEY,
    PAGE,
    SLOT0_PAGES,
    SLOT1_PAGES,
    batch,
    description,
    drain,
    handshake,
    make_pair,
    page_bytes,
    transfer,
    u64,
)

from transport.framing import OPTIONAL_FIELDS
from transport import (
    NEED_DATA,
    Accept,
    Close,
    Commit,
    Connection,
    ConnectionClosed,
    DeviceState,
    Done,
    Event,
    Hello,
    Loaded,
    Negotiated,
    PageBatch,
    Progress,
    Role,
    Running,
    State,
    VmDescription,
)

SLOTS = {0: SLOT0_PAGES, 1: SLOT1_PAGES}


def guest_memory() -> dict[int, np.ndarray]:
    """Source memory: every page recognisable, a few all-zero pages."""
    memory = {}
    for slot, pages in SLOTS.items():
        ram = np.frombuffer(b"".join(page_bytes(slot, p) for p in range(pages)), np.uint8).copy()
        ram = ram.reshape(pages, PAGE)
        ram[::5] = 0
        memory[slot] = ram
    return memory


def digest(memory: dict[int, np.ndarray]) -> bytes:
    hasher = hashlib.sha256()
    for slot in sorted(memory):
        hasher.update(memory[slot].tobytes())
    return hasher.digest()


def source_batches(memory: dict[int, np.ndarray]) -> list[PageBatch]:
    """Bulk copy in batches of up to 10 pages, zero pages as indices only; then a dirty round."""
    batches = []
    for slot, ram in memory.items():
        indices = np.arange(len(ram), dtype=np.uint64)
        for chunk in np.array_split(indices, max(1, len(ram) // 10)):
            is_zero = ~ram[chunk].any(axis=1)
            pages = np.ascontiguousarray(chunk[~is_zero])
            batches.append(
                PageBatch(
                    slot=slot,
                    round=0,
                    pages=pages,
                    zero_pages=np.ascontiguousarray(chunk[is_zero]),
                    data=np.ascontiguousarray(ram[pages]),
                )
            )
    dirty = np.array([1, 2, 3], dtype=np.uint64)
    batches.append(
        PageBatch(
            slot=0,
            round=1,
            pages=dirty,
            zero_pages=np.array([], np.uint64),
            data=np.ascontiguousarray(memory[0][dirty]),
        )
    )
    return batches


def apply_batch(memory: dict[int, np.ndarray], event: PageBatch) -> None:
    ram = memory[event.slot]
    ram[event.pages] = np.frombuffer(event.data, np.uint8).reshape(-1, PAGE)
    ram[event.zero_pages] = 0


def run_migration(source: Connection, target: Connection, carry: Carrier) -> tuple[list[Event], list[Event]]:
    """The whole protocol; `carry(sender, receiver, event)` moves one event's bytes."""
    memory = guest_memory()
    received = {slot: np.full((pages, PAGE), 0xAA, np.uint8) for slot, pages in SLOTS.items()}
    at_source: list[Event] = []
    at_target: list[Event] = []

    at_target += carry(source, target, source.make_hello())
    at_source += carry(target, source, target.make_hello())
    if source.state is State.AUTH_SOURCE:
        at_target += carry(source, target, source.make_auth())
        at_source += carry(target, source, target.make_auth())
    assert source.authenticated and target.authenticated
    at_target += carry(source, target, description())
    at_source += carry(target, source, Accept())
    for index, page_batch in enumerate(source_batches(memory)):
        got = carry(source, target, page_batch)
        at_target += got
        for event in got:
            apply_batch(received, event)  # type: ignore[arg-type]
        if index % 3 == 0:
            at_source += carry(target, source, Progress(index * PAGE, target.pages_transferred, 0))
    at_target += carry(source, target, DeviceState("vcpu0", b"\x01" * 300))
    at_target += carry(source, target, DeviceState("irqchip", b""))
    at_source += carry(target, source, Progress(1, target.pages_transferred, 1))
    at_target += carry(source, target, Done(source.pages_transferred, digest(memory), "full"))
    at_source += carry(target, source, Loaded(digest(received)))
    at_target += carry(source, target, Commit())
    at_source += carry(target, source, Running())
    at_target += carry(source, target, Close())
    at_source += carry(target, source, Close())
    assert source.state is target.state is State.CLOSED
    for slot in SLOTS:
        assert np.array_equal(received[slot], memory[slot])
    return at_source, at_target


class Carrier:
    def __call__(self, sender: Connection, receiver: Connection, event: Event) -> list[Event]:
        raise NotImplementedError


class Whole(Carrier):
    def __call__(self, sender: Connection, receiver: Connection, event: Event) -> list[Event]:
        return transfer(sender, receiver, event)


class ByteAtATime(Carrier):
    def __call__(self, sender: Connection, receiver: Connection, event: Event) -> list[Event]:
        events: list[Event] = []
        data = sender.send(event)
        for offset in range(len(data)):
            receiver.receive_data(data[offset : offset + 1])
            got = drain(receiver)
            assert not got or offset == len(data) - 1, "an event before its last byte"
            events += got
        return events


class Buffers(Carrier):
    """send_buffers, and random read sizes into get_receive_buffer, as recv_into would."""

    def __init__(self) -> None:
        self.random = random.Random(7)

    def __call__(self, sender: Connection, receiver: Connection, event: Event) -> list[Event]:
        data = b"".join(bytes(part) for part in sender.send_buffers(event))
        events: list[Event] = []
        offset = 0
        while offset < len(data):
            target = receiver.get_receive_buffer(self.random.choice([1, 7, 100, 5000, 1 << 20]))
            n = min(len(target), len(data) - offset, self.random.randint(1, 9000))
            target[:n] = data[offset : offset + n]
            receiver.receive_buffer_updated(n)
            offset += n
            events += drain(receiver)
        return events


def _count_bytes_sent(conn: Connection) -> list[int]:
    """A running total of the bytes `conn` hands out to be written."""
    total = [0]
    send_buffers = conn.send_buffers

    def counting(event: Event) -> list[bytes | memoryview]:
        buffers = send_buffers(event)
        total[0] += sum(memoryview(part).nbytes for part in buffers)
        return buffers

    conn.send_buffers = counting  # type: ignore[method-assign]
    return total


@pytest.mark.parametrize("carrier", [Whole(), ByteAtATime(), Buffers()], ids=lambda carrier: type(carrier).__name__)
def test_full_migration_with_psk(carrier: Carrier) -> None:
    source, target = make_pair()
    sent = _count_bytes_sent(source), _count_bytes_sent(target)
    at_source, at_target = run_migration(source, target, carrier)
    # Each side's count of what arrived is the other's count of what it wrote, however it was read.
    assert target.bytes_received == sent[0][0] > 0 and source.bytes_received == sent[1][0] > 0
    kinds = [type(event).__name__ for event in at_target]
    assert kinds[:3] == ["Hello", "Auth", "VmDescription"]
    assert kinds[-5:] == ["DeviceState", "DeviceState", "Done", "Commit", "Close"]
    assert [type(e).__name__ for e in at_source][-3:] == ["Loaded", "Running", "Close"]
    assert source.negotiated == Negotiated(
        version=2, auth="psk", capabilities=frozenset({OPTIONAL_FIELDS}), max_batch_bytes=8 << 20, peer_node="host-b"
    )
    assert target.negotiated is not None and target.negotiated.peer_node == "host-a"
    pages = sum(e.pages.size + e.zero_pages.size for e in at_target if isinstance(e, PageBatch))
    assert pages == target.pages_transferred == source.pages_transferred > SLOT0_PAGES
    source.receive_data(b"")
    target.receive_data(b"")
    assert source.next_event() == target.next_event() == ConnectionClosed(clean=True)


@pytest.mark.parametrize("mode", [{"tls": True}, {"allow_unauthenticated": True}])
def test_full_migration_without_psk_skips_auth(mode: dict[str, bool]) -> None:
    source, target = make_pair(**mode)
    at_source, at_target = run_migration(source, target, Whole())
    assert not any(type(event).__name__ == "Auth" for event in at_source + at_target)
    assert source.negotiated is not None
    assert source.negotiated.auth == ("tls" if "tls" in mode else "none")


def test_events_arrive_equal_to_what_was_sent() -> None:
    source, target = make_pair()
    hello = source.make_hello()
    assert transfer(source, target, hello) == [hello]
    transfer(target, source, target.make_hello())
    transfer(source, target, source.make_auth())
    transfer(target, source, target.make_auth())
    sent = description(cpu_features=[{"leaf": 7, "flags": [1, 2.5, None, b"\x00", "avx"]}])
    [got] = transfer(source, target, sent)
    assert got == sent and hash(got) == hash(sent)


def test_negotiation_takes_highest_version_common_caps_and_smallest_batch() -> None:
    source = Connection(Role.SOURCE, node="a", psk=KEY, capabilities={"zero-pages", "digest"}, max_batch_bytes=4 << 20)
    target = Connection(Role.TARGET, node="b", psk=KEY, capabilities={"digest", "compress"})
    handshake(source, target)
    assert source.negotiated == Negotiated(
        version=2,
        auth="psk",
        capabilities=frozenset({"digest", OPTIONAL_FIELDS}),
        max_batch_bytes=4 << 20,
        peer_node="b",
    )
    assert target.negotiated is not None
    assert target.negotiated.max_batch_bytes == 4 << 20
    assert target.negotiated.capabilities == frozenset({"digest", OPTIONAL_FIELDS})


def test_send_buffers_hand_out_the_page_data_itself() -> None:
    """Unsealed (tls: the edge's TLS encrypts), the page data goes out as it lies in RAM."""
    source, target = make_pair(tls=True)
    handshake(source, target)
    transfer(source, target, description())
    transfer(target, source, Accept())
    data = np.zeros((2, PAGE), np.uint8)
    event = PageBatch(slot=0, round=0, pages=u64(4, 9), zero_pages=u64(1), data=data)
    buffers = source.send_buffers(event)
    assert len(buffers) == 4  # prefix + header, pages, zero pages, data
    assert np.shares_memory(np.frombuffer(buffers[-1], np.uint8), data)
    assert bytes(buffers[1]) == np.array([4, 9], "<u8").tobytes()
    assert bytes(buffers[2]) == np.array([1], "<u8").tobytes()


def test_received_page_data_is_the_buffer_the_edge_read_into() -> None:
    """recv_into the payload: the event's data is that very buffer, no copy in between (unsealed:
    with tls the edge's TLS decrypts; sealed records have their own test)."""
    source, target = make_pair(tls=True)
    handshake(source, target)
    transfer(source, target, description())
    transfer(target, source, Accept())
    wire = source.send(batch(0, [3, 4, 5], [6]))
    header_len = 8 + int.from_bytes(wire[:4], "big")
    target.receive_data(wire[:header_len])
    assert target.next_event() is NEED_DATA
    lent = target.get_receive_buffer()
    assert len(lent) == len(wire) - header_len
    lent[:] = wire[header_len:]
    target.receive_buffer_updated(len(lent))
    [event] = drain(target)
    assert isinstance(event, PageBatch)
    assert isinstance(event.data, memoryview) and event.data.obj is lent.obj
    assert event.data.readonly and not event.pages.flags.writeable
    assert list(event.pages) == [3, 4, 5] and list(event.zero_pages) == [6]
    assert bytes(event.data) == page_bytes(0, 3) + page_bytes(0, 4) + page_bytes(0, 5)


def test_events_outlive_later_reads() -> None:
    """Events own their payloads: feeding more bytes later leaves them intact."""
    source, target = make_pair()
    handshake(source, target)
    transfer(source, target, description())
    transfer(target, source, Accept())
    stream = b"".join(source.send(batch(0, [page])) for page in range(40))
    events: list[Event] = []
    for offset in range(0, len(stream), 3000):
        target.receive_data(stream[offset : offset + 3000])
        events += drain(target)
    assert all(isinstance(e, PageBatch) for e in events)
    datas = [bytes(e.data) for e in events if isinstance(e, PageBatch)]
    assert datas == [page_bytes(0, p) for p in range(40)]
    assert len(target._buf) < 8192  # consumed bytes are dropped as we go


def test_many_frames_in_one_read() -> None:
    source, target = make_pair(tls=True)
    chunk = source.send(source.make_hello())
    target.receive_data(chunk)
    drain(target)
    source.receive_data(target.send(target.make_hello()))
    drain(source)
    target.receive_data(source.send(description()))
    assert [type(e).__name__ for e in drain(target)] == ["VmDescription"]
    source.receive_data(target.send(Accept()))
    drain(source)
    stream = b"".join(source.send(batch(1, [p], [p + 8])) for p in range(8))
    target.receive_data(stream + source.send(Done(16, None, "off")))
    events = drain(target)
    assert [type(e).__name__ for e in events] == ["PageBatch"] * 8 + ["Done"]
    assert target.state is State.LOADING


def test_need_data_until_complete_and_hello_is_fresh_each_time() -> None:
    source, target = make_pair()
    first, second = source.make_hello(), source.make_hello()
    assert first.nonce != second.nonce
    assert isinstance(first, Hello) and first.auth == "psk"
    assert target.next_event() is NEED_DATA


def test_the_x86_machine_facts_of_a_description_travel_as_sent() -> None:
    """cpu_features.vcpu_cpuid, msr_indices and xsave_bytes (the target builds and checks with
    them before ACCEPT) arrive byte for byte."""
    source, target = make_pair()
    handshake(source, target)
    entries = [struct.pack("<II", leaf, 0) + bytes(range(32)) for leaf in (0, 1, 7, 0xD)]
    features = {"vcpu_cpuid": entries, "msr_indices": [0x10, 0x1B, 0xC0000080], "xsave_bytes": 4096 + 64}
    [got] = transfer(source, target, description(cpu_features=features))
    assert isinstance(got, VmDescription)
    assert got.cpu_features == {
        "vcpu_cpuid": tuple(entries),
        "msr_indices": (0x10, 0x1B, 0xC0000080),
        "xsave_bytes": 4160,
    }
