"""The target's data plane: each data stream received and applied in its own OS thread.

A data connection is told apart from a control connection by its first byte (`is_data_stream`);
its hello names the migration and proves, with a token of that migration's session, that it came
from that migration's source (transport/datastream.py). Only then does a thread take the socket:
it reads exactly the frame or record in hand (`recv_into`, GIL released, woken once it is all
there: blocking.RecordReads), opens and checks it (sans-IO), and writes the batch into guest RAM
at once: one `pwritev` per run of pages into the RAM file (a fresh shmem page filled by a write
is neither faulted nor zeroed), or, where the backing refuses writes (hugetlbfs), one numpy copy
into the mapping. Never per page in Python.

Trio keeps the control: a stream that fails reports to the Target (which aborts the migration),
and the Target loads only after every stream's end marker arrived (`wait_ended`).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import trio

from transport import NEED_DATA, PageBatch, RemoteProtocolError
from transport.events import as_view
from transport.datastream import MAGIC, DataHello, DataReceiver, Layout, decode_hello, hello_size

from .. import tls
from ..config import PeerConfig
from ..kvm.memory import GuestMemory
from .blocking import RecordReads, block_with_deadline, deadline_s, is_timeout
from .parkedthreads import STREAM_THREADS
from .pagestream import PAGE_SIZE, apply_batch
from .recordbuffers import RECORD_BUFFERS

# A batch of more runs than this (a scattered dirty set) is one numpy scatter into the mapping
# instead: those pages were written before (warm), and a write call per run would be per page.
MAX_PWRITE_RUNS = 16


# struct tcp_info (<linux/tcp.h>): tcpi_bytes_received, a u64 at this offset, since Linux 4.1.
_TCP_INFO_BYTES_RECEIVED = struct.Struct("@Q")
_TCP_INFO_BYTES_RECEIVED_OFFSET = 128


def tcp_bytes_received(sock: socket.socket) -> int | None:
    """Bytes the kernel has taken in on this TCP connection, whether or not anyone read them yet
    (TCP_INFO's tcpi_bytes_received); None where the kernel does not say (not TCP, too old)."""
    end = _TCP_INFO_BYTES_RECEIVED_OFFSET + _TCP_INFO_BYTES_RECEIVED.size
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, end)
    except OSError:
        return None
    if len(info) < end:
        return None
    return int(_TCP_INFO_BYTES_RECEIVED.unpack_from(info, _TCP_INFO_BYTES_RECEIVED_OFFSET)[0])


def is_data_stream(first_byte: bytes) -> bool:
    return first_byte == MAGIC[:1]


async def read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise RemoteProtocolError(f"data stream closed after {len(data)} of {size} hello bytes")
        data += chunk
    return bytes(data)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RemoteProtocolError(f"data stream closed after {len(data)} of {size} hello bytes")
        data += chunk
    return bytes(data)


def read_hello_blocking(sock: socket.socket) -> DataHello:
    head = _recv_exactly(sock, 2)
    return decode_hello(head + _recv_exactly(sock, hello_size(head) - 2))


async def accept_hello(stream: trio.SocketStream, peer: PeerConfig) -> tuple[DataHello, socket.socket]:
    """Magic, (TLS,) hello of a data connection, under the caller's deadline; the socket is then
    a blocking one, for a thread. With TLS the handshake runs in a worker thread (stdlib ssl)."""
    magic = await read_exactly(stream, len(MAGIC))
    if magic != MAGIC:
        raise RemoteProtocolError("not a data stream (bad magic)")
    if peer.auth != "tls":
        head = await read_exactly(stream, 2)
        hello = decode_hello(head + await read_exactly(stream, hello_size(head) - 2))
        fd = stream.socket.detach()
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        return hello, sock
    fd = stream.socket.detach()
    raw = socket.socket(fileno=fd)
    raw.settimeout(peer.connect_timeout_s)

    def handshake() -> tuple[DataHello, socket.socket]:
        try:
            wrapped = tls.server_context(peer).wrap_socket(raw, server_side=True)
            return read_hello_blocking(wrapped), wrapped
        except BaseException:
            raw.close()
            raise

    return await trio.to_thread.run_sync(handshake, abandon_on_cancel=True)


class _Applier:
    """Writes batches into one VM's RAM, from any stream thread (each page has one stream)."""

    def __init__(self, memory: GuestMemory) -> None:
        self._fd = memory.fd
        self._offsets = {r.slot: r.offset for r in memory.regions}
        self._views = {r.slot: memory.view(r).reshape(-1, PAGE_SIZE) for r in memory.regions}
        self.use_pwrite = True

    def apply(self, batch: PageBatch) -> None:
        fresh = batch.round == 0
        runs = _runs(batch.pages) if self.use_pwrite and batch.pages.size else None
        if runs is None or runs[0].size > MAX_PWRITE_RUNS:
            apply_batch(self._views[batch.slot], batch, ram_is_fresh=fresh)
            return
        try:
            self._pwrite(batch, *runs)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise  # the RAM file is full or broken: the mapping would only SIGBUS
            # A backing that refuses write(2) (hugetlbfs): the mapping takes it instead.
            self.use_pwrite = False
            apply_batch(self._views[batch.slot], batch, ram_is_fresh=fresh)
            return
        if batch.zero_pages.size and not fresh:
            self._views[batch.slot][batch.zero_pages.astype(np.intp)] = 0

    def _pwrite(self, batch: PageBatch, starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]) -> None:
        pages = batch.pages
        data = as_view(batch.data).cast("B")
        base = self._offsets[batch.slot]
        for start, end in zip(starts.tolist(), ends.tolist()):
            offset = base + int(pages[start]) * PAGE_SIZE
            chunk = data[start * PAGE_SIZE : end * PAGE_SIZE]
            while chunk.nbytes:
                written = os.pwrite(self._fd, chunk, offset)
                chunk, offset = chunk[written:], offset + written


def _runs(pages: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(starts, ends) of the runs of consecutive pages in a batch, as positions in it."""
    breaks = np.flatnonzero(np.diff(pages.astype(np.int64)) != 1) + 1
    starts = np.concatenate(([0], breaks)).astype(np.int64)
    ends = np.concatenate((breaks, [pages.size])).astype(np.int64)
    return starts, ends


class _ReceiveThread:
    def __init__(
        self,
        sock: socket.socket,
        receiver: DataReceiver,
        applier: _Applier,
        io_timeout_s: float,
        on_end: Callable[[int], None],
        on_error: Callable[[int, str], None],
    ) -> None:
        self.sock = sock
        self.receiver = receiver
        self._applier = applier
        self._on_end = on_end
        self._on_error = on_error
        self.pages = 0
        self.zero_pages = 0
        self.bytes = 0
        self.apply_s = 0.0
        # Pages (data and zero) per round: the bulk copy's and the final pass's are in the stats.
        self.entries_by_round: dict[int, int] = {}
        block_with_deadline(sock, io_timeout_s)
        # A whole record (or frame part) per call and per wake-up (blocking.py); a TLS socket
        # reads records of its own.
        self._reads = None if isinstance(sock, ssl.SSLSocket) else RecordReads(sock, io_timeout_s)
        self.thread = STREAM_THREADS.start(self._run, f"data-recv-{receiver.index}")

    def _run(self) -> None:
        index = self.receiver.index
        try:
            self._receive()
        except OSError as err:
            if is_timeout(err):
                self._on_error(index, f"data stream {index}: nothing received for {deadline_s(self.sock):g} s")
            else:
                self._on_error(index, str(err) or type(err).__name__)
        except RemoteProtocolError as err:
            self._on_error(index, str(err) or type(err).__name__)
        except Exception as err:  # a bug: reported, the migration fails, the daemon goes on
            self._on_error(index, f"data stream {index} crashed: {type(err).__name__}: {err}")

    def _receive(self) -> None:
        receiver = self.receiver
        while True:
            buffer = receiver.receive_buffer()
            nbytes = self.sock.recv_into(buffer) if self._reads is None else self._reads.recv_into(buffer)
            receiver.received(nbytes)
            self.bytes += nbytes
            while True:
                event = receiver.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, PageBatch):
                    started = time.perf_counter()
                    self._applier.apply(event)
                    self.apply_s += time.perf_counter() - started
                    self.pages += int(event.pages.size)
                    self.zero_pages += int(event.zero_pages.size)
                    entries = int(event.pages.size) + int(event.zero_pages.size)
                    self.entries_by_round[event.round] = self.entries_by_round.get(event.round, 0) + entries
                    continue
                self._on_end(receiver.index)
                return


class ReceiveStreams:
    """The data streams of one incoming migration."""

    def __init__(
        self, count: int, secret: bytes, layout: Layout, *, sealed: bool, memory: GuestMemory, io_timeout_s: float
    ) -> None:
        self.count = count
        self._secret = secret
        self._layout = layout
        self._sealed = sealed
        self._applier = _Applier(memory)
        self._io_timeout_s = io_timeout_s
        self._threads: dict[int, _ReceiveThread] = {}
        self._ended: set[int] = set()
        self._changed = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self.error: str | None = None
        self.on_failure: Callable[[str], None] | None = None
        self._closed = False

    def attach(self, hello: DataHello, sock: socket.socket) -> None:
        """A data connection that says it is ours: checked, then given its thread. Raises
        RemoteProtocolError (the caller closes the socket) for anything that does not fit."""
        hello.check_token(self._secret)
        if self._closed:
            raise RemoteProtocolError(f"data stream {hello.index}: the migration has ended")
        if hello.count != self.count:
            raise RemoteProtocolError(f"data stream says {hello.count} streams; the VM description said {self.count}")
        if hello.index in self._threads:
            raise RemoteProtocolError(f"data stream {hello.index} connected twice")
        receiver = DataReceiver(self._secret, hello.index, self._layout, sealed=self._sealed, buffers=RECORD_BUFFERS)
        self._threads[hello.index] = _ReceiveThread(
            sock, receiver, self._applier, self._io_timeout_s, self._report_end, self._report_error
        )

    def totals(self) -> tuple[int, int, int, float]:
        """(pages, zero pages, bytes, apply seconds) over every stream so far."""
        threads = list(self._threads.values())
        return (
            sum(t.pages for t in threads),
            sum(t.zero_pages for t in threads),
            sum(t.bytes for t in threads),
            sum(t.apply_s for t in threads),
        )

    def arrived_bytes(self) -> int:
        """Bytes that reached this host on every stream so far, read or not: a receive thread
        waits in the kernel for a whole record (blocking.RecordReads), and its own count moves
        only when the record is in or its call's deadline returns part of it. Under a low bandwidth cap a
        record takes longer than the link's silence window, so the link's watch counts what the
        kernel took in (each stream's own count where the kernel does not say)."""
        total = 0
        for thread in list(self._threads.values()):
            arrived = tcp_bytes_received(thread.sock)
            total += thread.bytes if arrived is None else max(arrived, thread.bytes)
        return total

    def entries_in_round(self, round_: int) -> int:
        """Pages (data and zero) of one round over every stream so far."""
        return sum(t.entries_by_round.get(round_, 0) for t in list(self._threads.values()))

    @property
    def all_ended(self) -> bool:
        return len(self._ended) == self.count

    async def wait_ended(self) -> None:
        """Until every stream's end marker arrived and what came before it was applied."""
        while not self.all_ended and self.error is None:
            await self._changed.wait()
        if self.error is not None:
            raise RemoteProtocolError(self.error)

    def _report_end(self, index: int) -> None:  # in a stream's thread
        self._call_soon(self._ended_in_trio, index)

    def _report_error(self, index: int, message: str) -> None:  # in a stream's thread
        self._call_soon(self._failed_in_trio, message)

    def _call_soon(self, fn: Callable[..., None], *args: object) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _wake(self) -> None:
        """Every waiter of `wait_ended` looks again. The setter, not a waiter, renews the event:
        a waiter that renewed it would leave a second waiter on an event nobody sets."""
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _ended_in_trio(self, index: int) -> None:
        self._ended.add(index)
        self._wake()

    def _failed_in_trio(self, message: str) -> None:
        if self._closed or self.error is not None:
            return
        self.error = message
        self._wake()
        if self.on_failure is not None:
            self.on_failure(message)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        threads = list(self._threads.values())
        for thread in threads:
            try:
                thread.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def join() -> None:
            for thread in threads:
                thread.thread.join()
                thread.sock.close()
                thread.receiver.release()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(join)
