"""What the data streams keep between records and migrations, and how their sockets wait.

Record buffers (recordbuffers.py) are reused by the next stream of either direction: the pool
stays bounded, a reused buffer still holding another stream's bytes seals and opens exactly
what it must, and a changed byte still fails. The sockets (blocking.py) block in the kernel
for a whole record under SO_SNDTIMEO/SO_RCVTIMEO (a receiving thread woken once the record can
be read, not per segment, RecordReads): a silent or stuck peer still ends a stream
with an error that names the stream and the deadline, on either side. Real loopback TCP, real
threads; no VM (the pages are what matters)."""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

from migrated.kvm.memory import GuestMemory
from migrated.migration.blocking import RecordReads, block_with_deadline, deadline_s, is_timeout
from migrated.migration.ratelimit import TokenBucket
from migrated.migration.recordbuffers import RecordBuffers, largest_record_bytes
from migrated.migration.recvstreams import _Applier, _ReceiveThread
from migrated.migration.sendstreams import _Job, _StreamThread, chunk_runs
from transport import seal
from transport.datastream import DataReceiver, DataSender, Layout

MIB = 1 << 20
PAGE = 4096


def _records(sealer: seal.Sealer, frame: bytes) -> bytes:
    return b"".join(bytes(part) for part in sealer.seal([frame]))


def _open_all(opener: seal.Opener, data: bytes) -> list[bytes]:
    frames = []
    view = memoryview(data)
    while view.nbytes:
        if opener.missing:
            buffer = opener.receive_buffer()
            take = min(buffer.nbytes, view.nbytes)
            buffer[:take] = view[:take]
            opener.received(take)
        else:
            take = min(7, view.nbytes)  # between records: a few bytes at a time, as a socket may
            opener.feed(view[:take])
        view = view[take:]
        while (frame := opener.next_frame()) is not None:
            frames.append(bytes(frame))
    return frames


def test_the_pool_keeps_the_largest_buffers_within_its_bounds() -> None:
    pool = RecordBuffers(max_kept=2, max_kept_bytes=3 * MIB)
    buffers = [pool.take(size) for size in (MIB, 2 * MIB, MIB // 2, 3 * MIB)]
    assert pool.allocated == 4 and pool.kept_bytes == 0
    for buffer in buffers:
        pool.give(buffer)
    # Two kept at most, 3 MiB at most: the 3 MiB one alone (with the 2 MiB one it would be 5).
    assert pool.kept_bytes == 3 * MIB
    assert pool.take(MIB) is buffers[3]  # the largest, for a stream whose records grow
    assert pool.take(MIB) is not buffers[2] and pool.allocated == 5  # nothing kept: a new one


def test_a_prefilled_pool_serves_the_largest_records_of_both_sides_without_allocating() -> None:
    """The warm-up fills the pool (warmup.py): the largest record a batch of max_batch_bytes
    makes, sealed and opened, takes buffers from it; filling again stays within the bounds."""
    pool = RecordBuffers()
    size = largest_record_bytes(8 * MIB)
    assert pool.prefill(size) == 4 and pool.kept_bytes == 4 * size and pool.allocated == 0
    key = os.urandom(32)
    sealer = seal.Sealer(key, pool)
    opener = seal.Opener(key, size - seal.TAG_BYTES - 16, reuse=True, buffers=pool)
    frame = os.urandom(size - seal.TAG_BYTES - 16)  # the largest frame the opener allows
    assert _open_all(opener, _records(sealer, frame)) == [frame]
    assert pool.allocated == 0, "a record did not fit the prefilled buffers"
    sealer.release()
    opener.release()
    assert pool.prefill(size) == 0 and pool.kept_bytes == 4 * size


def test_a_reused_buffer_seals_and_opens_the_next_streams_frames_exactly() -> None:
    """Stream 1 fills the buffers with its bytes; stream 2 (another key, smaller and larger
    frames) reuses them without allocating, and every frame opens as it was sealed."""
    pool = RecordBuffers()
    key1, key2 = os.urandom(32), os.urandom(32)
    sealer, opener = seal.Sealer(key1, pool), seal.Opener(key1, 4 * MIB, reuse=True, buffers=pool)
    first = [os.urandom(3 * MIB)]
    assert _open_all(opener, b"".join(_records(sealer, f) for f in first)) == first
    sealer.release()
    opener.release()
    made = pool.allocated
    assert made == 3 and pool.kept_bytes >= 3 * 3 * MIB  # the sealer's, the opener's record and frame

    sealer, opener = seal.Sealer(key2, pool), seal.Opener(key2, 4 * MIB, reuse=True, buffers=pool)
    frames = [os.urandom(100), os.urandom(MIB), b"\x00" * (2 * MIB), os.urandom(17)]
    wire = b"".join(_records(sealer, f) for f in frames)
    assert _open_all(opener, wire) == frames
    assert pool.allocated == made, "the second stream allocated although warm buffers were kept"

    # A changed byte still fails its tag in a reused buffer.
    tampered = bytearray(_records(sealer, os.urandom(5000)))
    tampered[100] ^= 1
    with pytest.raises(Exception, match="failed authentication"):
        _open_all(opener, bytes(tampered))


def test_a_reusing_opener_opens_each_record_into_a_buffer_of_its_own() -> None:
    """Never in place: cryptography 51 refuses overlapping input and output (ValueError: data and
    buf must not overlap), which broke every sealed stream; earlier versions never promised it.
    The frame lies outside the buffer records are received into, and stays intact while the
    next record arrives there."""
    key = os.urandom(32)
    sealer, opener = seal.Sealer(key), seal.Opener(key, MIB, reuse=True, buffers=RecordBuffers())
    first, second = os.urandom(MIB), os.urandom(MIB)
    wire = memoryview(_records(sealer, first) + _records(sealer, second))
    record_bytes = len(wire) // 2
    opener.feed(wire[: seal.LENGTH.size])
    assert opener.next_frame() is None  # the length is in: the record starts
    received = opener.receive_buffer()
    received[:] = wire[seal.LENGTH.size : record_bytes]
    opener.received(received.nbytes)
    frame = opener.next_frame()
    assert frame is not None and bytes(frame) == first
    opener.feed(wire[record_bytes : record_bytes + seal.LENGTH.size])
    assert opener.next_frame() is None
    arriving = opener.receive_buffer()
    assert not np.shares_memory(np.frombuffer(frame, np.uint8), np.frombuffer(arriving, np.uint8))
    arriving[:] = wire[record_bytes + seal.LENGTH.size :]
    assert bytes(frame) == first, "the next record overwrote the frame before it was done with"
    opener.received(arriving.nbytes)
    frame = opener.next_frame()
    assert frame is not None and bytes(frame) == second


def _voluntary_switches() -> int:
    """How often the calling thread went to sleep (/proc/thread-self/status)."""
    with open("/proc/thread-self/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/thread-self/status")


def test_a_record_sent_in_pieces_wakes_its_reader_a_few_times_not_once_per_piece() -> None:
    """RecordReads: a 4 MiB record sent in 64 pieces of 64 KiB arrives whole, and the reading
    thread sleeps a few times in all, not once per piece (MSG_WAITALL alone: 25-57 here)."""
    client, server = _pair()
    try:
        block_with_deadline(server, 30.0)
        assert server.gettimeout() is None and deadline_s(server) == pytest.approx(30.0)
        payload = os.urandom(4 * MIB)
        buffer = memoryview(bytearray(4 * MIB))
        outcome: dict[str, int] = {}

        def read() -> None:
            reads = RecordReads(server, 30.0)
            before, got, calls = _voluntary_switches(), 0, 0
            while got < buffer.nbytes:
                received = reads.recv_into(buffer[got:])
                assert received > 0, "the peer closed mid-record"
                got, calls = got + received, calls + 1
            outcome.update(sleeps=_voluntary_switches() - before, calls=calls)

        reader = threading.Thread(target=read)
        reader.start()
        for offset in range(0, len(payload), 64 * 1024):
            client.sendall(payload[offset : offset + 64 * 1024])
        reader.join(60)
        assert not reader.is_alive()
        assert bytes(buffer) == payload
        assert outcome["sleeps"] < 16, outcome
    finally:
        client.close()
        server.close()


def test_a_reader_woken_short_of_its_record_asks_only_for_the_rest() -> None:
    """The receive buffer is locked small, so the kernel caps the low-water mark far below the
    record and wakes the reader many times short of it; each next call asks for what is still
    missing, down to the last 100 bytes. A mark left above what is still to come would never be
    reached: the reader would sleep to its deadline (60 s) with the bytes queued."""
    client, server = _pair()
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        block_with_deadline(server, 60.0)
        payload = os.urandom(MIB + 100)
        buffer = memoryview(bytearray(len(payload)))
        calls: list[int] = []

        def read() -> None:
            reads = RecordReads(server, 60.0)
            got = 0
            while got < buffer.nbytes:
                received = reads.recv_into(buffer[got:])
                assert received > 0, "the peer closed mid-record"
                got += received
                calls.append(received)

        reader = threading.Thread(target=read)
        reader.start()
        client.sendall(payload)  # and the connection stays open, silent
        reader.join(30)
        assert not reader.is_alive(), "the reader waited for a low-water mark that could not be reached"
        assert bytes(buffer) == payload
        assert len(calls) > 1  # woken short of the record at least once
    finally:
        client.close()
        server.close()


def test_a_reader_at_its_deadline_gets_what_arrived_and_then_a_timeout() -> None:
    """The deadline keeps its meaning under RecordReads: what arrived by then is returned (100
    of the 1,000 bytes asked for), and a deadline with nothing at all is a timeout."""
    client, server = _pair()
    try:
        block_with_deadline(server, 0.3)
        reads = RecordReads(server, 0.3)
        client.sendall(b"x" * 100)
        buffer = memoryview(bytearray(1000))
        assert reads.recv_into(buffer) == 100
        assert bytes(buffer[:100]) == b"x" * 100
        with pytest.raises(OSError) as raised:
            reads.recv_into(buffer[100:])
        assert is_timeout(raised.value)
        client.close()
        assert reads.recv_into(buffer[100:]) == 0  # the peer closed: end of stream, as recv says
    finally:
        client.close()
        server.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def test_a_silent_source_ends_the_receive_thread_with_the_deadline_named() -> None:
    client, server = _pair()
    dst = GuestMemory.flat(4 * MIB, "dst")
    errors: list[str] = []
    done = threading.Event()
    try:
        layout = Layout({0: dst.size // PAGE}, PAGE, MIB)
        receiver = DataReceiver(os.urandom(32), 0, layout, sealed=True)
        thread = _ReceiveThread(
            server, receiver, _Applier(dst), 0.3, lambda index: done.set(), lambda i, m: (errors.append(m), done.set())
        )
        assert done.wait(30), "the receive thread never gave up on a silent source"
        thread.thread.join(10)
        assert errors == ["data stream 0: nothing received for 0.3 s"]
    finally:
        client.close()
        server.close()
        dst.close()


def test_a_target_that_takes_nothing_ends_the_send_with_the_deadline_named() -> None:
    """The target's end never reads: once both socket buffers are full, the blocked sendmsg
    returns at its deadline and the stream's job fails, naming the stream and the deadline."""
    client, server = _pair()
    src = GuestMemory.flat(64 * MIB, "src")
    stop = threading.Event()
    thread: _StreamThread | None = None
    try:
        src.bytes[:] = 0x5A
        block_with_deadline(client, 0.3)
        layout = Layout({0: src.size // PAGE}, PAGE, 8 * MIB)
        thread = _StreamThread(
            client, DataSender(os.urandom(32), 0, layout, sealed=True), src, 2047, TokenBucket(0, stop), stop
        )
        outcome: list[BaseException | None] = []
        reported = threading.Event()

        def report(error: BaseException | None) -> None:
            outcome.append(error)
            reported.set()

        runs = chunk_runs([(0, src.size // PAGE)], 0, 1, 2047)
        thread.submit(_Job("ranges", slot=0, round=0, ranges=runs, report=report))
        assert reported.wait(60), "the send never gave up on a target that takes nothing"
        thread.thread.join(10)
        assert outcome and outcome[0] is not None
        assert str(outcome[0]) == "data stream 0 made no progress for 0.3 s (nothing received by the peer)"
        assert stop.is_set()
    finally:
        # The thread seals from `src`: joined before it is unmapped, pass or fail (a thread
        # left reading unmapped RAM crashes the whole run instead of failing this test).
        stop.set()
        for sock in (client, server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if thread is not None:
            thread.submit(None)
            thread.thread.join(10)
        client.close()
        server.close()
        src.close()


def test_timeouts_are_told_apart_from_other_socket_errors() -> None:
    assert is_timeout(TimeoutError())
    assert is_timeout(BlockingIOError(11, "Resource temporarily unavailable"))
    assert not is_timeout(ConnectionResetError(104, "reset"))
