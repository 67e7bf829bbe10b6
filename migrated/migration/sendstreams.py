"""The source's data plane: pages to the target over N data streams, each in its own OS thread.

Trio keeps the control: it hands each stream thread a job (a pass of the bulk copy, a dirty set,
the end marker) and waits for every stream to report it done; the threads only build batches from
guest RAM, seal them and send them on a blocking socket (the GIL is released in `sendmsg`, in the
AEAD and in numpy's zero scan). A page always goes on the stream of its 2 MiB chunk
(`stream_of`), so TCP's order within that stream orders its versions (transport/datastream.py
rule 4). Counters are plain ints the threads add to and trio reads for progress.

Stopping (`aclose`): the sockets are shut down, which ends any blocked send at once, the bandwidth
limiter's waits end, and the threads are joined.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import trio

from transport import PageBatch
from transport.datastream import MAGIC, DataHello, DataSender, Layout

from .. import tls
from ..config import PeerConfig
from ..kvm.dirty import DirtyPages
from ..kvm.memory import GuestMemory
from .blocking import block_with_deadline, deadline_s, is_timeout
from .parkedthreads import STREAM_THREADS
from .pagestream import PAGE_SIZE, _split_zero
from .ratelimit import BURST_S, TokenBucket
from .recordbuffers import RECORD_BUFFERS

CHUNK_SHIFT = 9
"""2 MiB of 4 KiB pages travel on one stream: long runs for the sender, and every stream busy."""

# Under a bandwidth limit, the bounds of one paced slice (`_send_paced`): a syscall per 16 KiB is
# nothing at the rates that need pacing; 1 MiB keeps a stream's gaps short up to 20 MiB/s per
# slice of BURST_S, and above that the records are gone in well under a second anyway.
PACED_SLICE_MIN = 16 << 10
PACED_SLICE_MAX = 1 << 20

# A dirty set whose runs average at least this many pages is sent run by run, from guest RAM.
MIN_RUN_PAGES = 16

Pages = npt.NDArray[np.uint64]
Report = Callable[[BaseException | None], None]


def stream_of(pages: Pages, count: int) -> npt.NDArray[np.uint64]:
    """The stream each page travels on, always the same one."""
    return (pages >> np.uint64(CHUNK_SHIFT)) % np.uint64(count)


def chunk_runs(extents: Sequence[tuple[int, int]], index: int, count: int, max_pages: int) -> list[tuple[int, int]]:
    """The page ranges [first, end) of `extents` that stream `index` of `count` carries, each at
    most `max_pages` long (adjacent chunks of the same stream, with one stream, are merged)."""
    runs: list[tuple[int, int]] = []
    for first, end in extents:
        chunk = first >> CHUNK_SHIFT
        chunk += (index - chunk) % count
        while (chunk << CHUNK_SHIFT) < end:
            start, stop = max(first, chunk << CHUNK_SHIFT), min(end, (chunk + 1) << CHUNK_SHIFT)
            if runs and runs[-1][1] == start and stop - runs[-1][0] <= max_pages:
                runs[-1] = (runs[-1][0], stop)
            else:
                while stop - start > max_pages:
                    runs.append((start, start + max_pages))
                    start += max_pages
                runs.append((start, stop))
            chunk += count
    return runs


def group_runs(runs: Sequence[tuple[int, int]], max_pages: int) -> list[list[tuple[int, int]]]:
    """`runs` (each at most `max_pages` long) in order, gathered into batches of at most
    `max_pages` pages: with N streams a stream's runs are single 2 MiB chunks, and a record per
    chunk costs ~10% more CPU per GiB on both sides than one per batch (bench/dataplane_cpu.py)."""
    groups: list[list[tuple[int, int]]] = []
    filled = max_pages
    for first, end in runs:
        if filled + end - first > max_pages:
            groups.append([])
            filled = 0
        groups[-1].append((first, end))
        filled += end - first
    return groups


@dataclass
class StreamCounters:
    """Added to by one stream thread; read (without a lock: ints) by trio for progress."""

    bytes: int = 0
    pages: int = 0  # sent with data
    zero_pages: int = 0
    batches: int = 0


@dataclass
class _Job:
    kind: Literal["ranges", "pages", "end"]
    slot: int = 0
    round: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)
    pages: Pages | None = None
    report: Report | None = None


class _StreamThread:
    def __init__(
        self,
        sock: socket.socket,
        sender: DataSender,
        memory: GuestMemory,
        batch_pages: int,
        limiter: TokenBucket,
        stop: threading.Event,
    ) -> None:
        self.sock = sock
        self.sender = sender
        self.counters = StreamCounters()
        self._views = {r.slot: memory.view(r).reshape(-1, PAGE_SIZE) for r in memory.regions}
        self._batch_pages = batch_pages
        self._limiter = limiter
        self._stop = stop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._sendmsg = not isinstance(sock, ssl.SSLSocket)  # an SSL socket has no sendmsg
        self.thread = STREAM_THREADS.start(self._run, f"data-stream-{sender.index}")

    def submit(self, job: _Job | None) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            error: BaseException | None = None
            try:
                self._do(job)
            except OSError as err:
                if is_timeout(err):
                    # Nothing taken by the peer for the socket's timeout: a cut link sends no RST.
                    err = OSError(
                        f"data stream {self.sender.index} made no progress for {deadline_s(self.sock):g} s "
                        "(nothing received by the peer)"
                    )
                error = err
                self._stop.set()
            except Exception as err:  # reported to trio, which fails the migration
                error = err
                self._stop.set()
            if job.report is not None:
                job.report(error)
            if error is not None:
                return

    def _do(self, job: _Job) -> None:
        if job.kind == "end":
            self._send(self.sender.end())
            return
        ram = self._views[job.slot]
        if job.kind == "ranges":
            for runs in group_runs(job.ranges, self._batch_pages):
                self._runs(job.slot, job.round, ram, runs)
            return
        pages = job.pages
        assert pages is not None
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        if breaks.size * MIN_RUN_PAGES < pages.size:
            # Mostly long runs (a guest rewriting whole ranges): each run straight from guest
            # RAM, no gather copy; a loop per run, and runs are few.
            bounds = [0, *breaks.tolist(), int(pages.size)]
            for first, end in zip(bounds[:-1], bounds[1:]):
                page = int(pages[first])
                for start in range(first, end, self._batch_pages):
                    stop = min(end, start + self._batch_pages)
                    base = page + start - first
                    self._block(job.slot, job.round, pages[start:stop], ram[base : base + stop - start])
            return
        for start in range(0, pages.size, self._batch_pages):
            chunk = pages[start : start + self._batch_pages]
            first, last = int(chunk[0]), int(chunk[-1])
            if last - first + 1 == chunk.size:
                block = ram[first : last + 1]  # a run: straight from guest RAM
            else:
                block = ram[chunk.astype(np.intp)]  # scattered: one gather per batch
            self._block(job.slot, job.round, chunk, block)

    def _runs(self, slot: int, round_: int, ram: npt.NDArray[np.uint8], runs: list[tuple[int, int]]) -> None:
        """Page ranges of guest RAM as one batch: each run's data where it lies (with its zero
        pages taken out), the runs one after the other in the batch."""
        if len(runs) == 1:
            first, end = runs[0]
            self._block(slot, round_, np.arange(first, end, dtype=np.uint64), ram[first:end])
            return
        if self._stop.is_set():
            raise OSError("data streams stopped")
        pages: list[Pages] = []
        zero: list[Pages] = []
        data: list[memoryview] = []
        for first, end in runs:
            indices, block = np.arange(first, end, dtype=np.uint64), ram[first:end]
            nonzero = _split_zero(block)
            if not nonzero.all():
                indices, block, zero = indices[nonzero], block[nonzero], [*zero, indices[~nonzero]]
            pages.append(indices)
            data.append(block.reshape(-1).data)
        empty = np.empty(0, np.uint64)
        batch = PageBatch(
            slot=slot,
            round=round_,
            pages=np.concatenate(pages),
            zero_pages=np.concatenate(zero) if zero else empty,
            data=b"",
        )
        self._send_batch(batch, data)

    def _block(self, slot: int, round_: int, pages: Pages, block: npt.NDArray[np.uint8]) -> None:
        if self._stop.is_set():
            raise OSError("data streams stopped")
        nonzero = _split_zero(block)
        if nonzero.all():
            zero = np.empty(0, np.uint64)
        else:
            pages, zero, block = pages[nonzero], pages[~nonzero], block[nonzero]
        self._send_batch(PageBatch(slot=slot, round=round_, pages=pages, zero_pages=zero, data=block.reshape(-1).data))

    def _send_batch(self, batch: PageBatch, data: Sequence[memoryview] = ()) -> None:
        if self._limiter.rate > 0:
            self._send_paced(self.sender.batch(batch, data))
        else:
            self._send(self.sender.batch(batch, data))
        pages, zero = batch.pages, batch.zero_pages
        counters = self.counters
        counters.batches += 1
        counters.pages += int(pages.size)
        counters.zero_pages += int(zero.size)

    def _send_paced(self, buffers: list[bytes | memoryview]) -> None:
        """Under a bandwidth limit a record goes out in slices, each once the limit lets its bytes
        go. Taken whole, a record of max_batch_bytes (8 MiB) left its stream silent while the
        others' records went: 16 s per record at 1 MiB/s over 2 streams, beyond the receiver's
        timeout (peer.connect_timeout_s, 10 s), which failed a migration the operator had only
        slowed down. A slice is what the limit lets through in BURST_S, within bounds."""
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            start = 0
            while start < view.nbytes:
                step = int(min(max(self._limiter.rate * BURST_S, PACED_SLICE_MIN), PACED_SLICE_MAX))
                part = view[start : start + step]
                if not self._limiter.take(part.nbytes):
                    raise OSError("data streams stopped")
                self._send([part])
                start += part.nbytes

    def _send(self, buffers: list[bytes | memoryview]) -> None:
        views = [memoryview(b).cast("B") for b in buffers if memoryview(b).nbytes]
        if not self._sendmsg:
            for view in views:
                self.sock.sendall(view)
                self.counters.bytes += view.nbytes
            return
        while views:
            sent = self.sock.sendmsg(views)
            self.counters.bytes += sent
            while views and sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]


def _connect_one(
    host: str, port: int, peer: PeerConfig, hello: DataHello, timeout_s: float, io_timeout_s: float
) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(MAGIC)
        if peer.auth == "tls":
            sock = tls.client_context(peer).wrap_socket(sock, server_hostname=host)
        sock.sendall(hello.encode())
        # A link that takes no byte for this long is broken (a cut cable sends no RST).
        block_with_deadline(sock, io_timeout_s)
        return sock
    except BaseException:
        sock.close()
        raise


class Pass:
    """Jobs handed to the stream threads; `wait()` returns when all are done (or raises the
    first failure). The threads report through the token of trio's thread, where `wait()` runs;
    it may be created in a worker thread of that run."""

    def __init__(self, jobs: int, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._done = trio.Event()
        self._remaining = jobs
        self._errors: list[BaseException] = []
        if not jobs:
            self._done.set()

    def report(self, error: BaseException | None) -> None:  # in a stream's thread
        try:
            self._token.run_sync_soon(self._finished, error)
        except trio.RunFinishedError:
            pass

    def _finished(self, error: BaseException | None) -> None:  # in trio's thread
        self._remaining -= 1
        if error is not None:
            self._errors.append(error)
        if self._remaining == 0 or error is not None:
            self._done.set()

    async def wait(self) -> None:
        await self._done.wait()
        if self._errors:
            err = self._errors[0]
            text = str(err) or type(err).__name__
            raise OSError(text if text.startswith("data stream") else f"data stream failed: {text}") from err


async def connect_streams(
    host: str, port: int, peer: PeerConfig, secret: bytes, migration_id: str, count: int
) -> list[socket.socket]:
    """`count` data connections, each with its hello sent, in stream order; in a worker thread,
    bounded by the connect timeout and not cancellable: the sockets are ours either way."""

    def connect_all() -> list[socket.socket]:
        sockets: list[socket.socket] = []
        try:
            for index in range(count):
                hello = DataHello.make(secret, migration_id, index, count)
                sockets.append(_connect_one(host, port, peer, hello, peer.connect_timeout_s, peer.connect_timeout_s))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets

    return await trio.to_thread.run_sync(connect_all)


class SendStreams:
    """N data streams of one migration, from guest RAM to the target."""

    def __init__(
        self,
        threads: list[_StreamThread],
        stop: threading.Event,
        limiter: TokenBucket,
        token: trio.lowlevel.TrioToken | None = None,
    ) -> None:
        self._threads = threads
        self._stop = stop
        self.limiter = limiter
        self._closed = False
        # Passes report here; start_pages and start_end may run in a worker thread (the
        # downtime starts the final pages from the thread that paused the VM). `token`: made in
        # a worker thread (`over`), the run's token is passed in.
        self._token = token or trio.lowlevel.current_trio_token()

    @classmethod
    async def open(
        cls,
        *,
        host: str,
        port: int,
        peer: PeerConfig,
        secret: bytes,
        sealed: bool,
        migration_id: str,
        count: int,
        memory: GuestMemory,
        layout: Layout,
        batch_pages: int,
        bandwidth_bytes_s: float,
    ) -> SendStreams:
        sockets = await connect_streams(host, port, peer, secret, migration_id, count)
        return cls.over(sockets, secret, sealed, memory, layout, batch_pages, bandwidth_bytes_s)

    @classmethod
    def over(
        cls,
        sockets: list[socket.socket],
        secret: bytes,
        sealed: bool,
        memory: GuestMemory,
        layout: Layout,
        batch_pages: int,
        bandwidth_bytes_s: float,
        token: trio.lowlevel.TrioToken | None = None,
    ) -> SendStreams:
        """Streams over sockets already connected with their hellos (`connect_streams`). Their
        threads come from the parked ones (parkedthreads.py), so this is cheap on the event loop;
        from a worker thread, pass the run's `token`."""
        stop = threading.Event()
        limiter = TokenBucket(bandwidth_bytes_s, stop)
        threads = [
            _StreamThread(
                sock,
                DataSender(secret, index, layout, sealed=sealed, buffers=RECORD_BUFFERS),
                memory,
                batch_pages,
                limiter,
                stop,
            )
            for index, sock in enumerate(sockets)
        ]
        return cls(threads, stop, limiter, token)

    @property
    def count(self) -> int:
        return len(self._threads)

    def totals(self) -> StreamCounters:
        total = StreamCounters()
        for thread in self._threads:
            c = thread.counters
            total.bytes += c.bytes
            total.pages += c.pages
            total.zero_pages += c.zero_pages
            total.batches += c.batches
        return total

    async def send_extents(self, extents: Mapping[int, Sequence[tuple[int, int]]], round_: int) -> None:
        """The bulk copy: these page ranges of each slot, every stream its own chunks."""
        count = self.count
        jobs: list[tuple[int, _Job]] = []
        for index in range(count):
            for slot, ranges in extents.items():
                runs = chunk_runs(ranges, index, count, self._batch_pages)
                if runs:
                    jobs.append((index, _Job("ranges", slot=slot, round=round_, ranges=runs)))
        await self._run(jobs)

    async def send_pages(self, dirty: DirtyPages, round_: int) -> None:
        """A dirty set, every page on its own stream, sorted within it."""
        await self.start_pages(dirty, round_).wait()

    def start_pages(self, dirty: DirtyPages, round_: int) -> Pass:
        """`send_pages` begun now: its jobs are queued behind every earlier one of each stream
        (so a page sent again later reaches the target later), and `wait()` ends it."""
        count = self.count
        jobs: list[tuple[int, _Job]] = []
        for slot, pages in dirty.by_slot.items():
            if not pages.size:
                continue
            ordered = np.sort(pages)
            streams = stream_of(ordered, count)
            for index in range(count):
                mine = ordered[streams == index]
                if mine.size:
                    jobs.append((index, _Job("pages", slot=slot, round=round_, pages=mine)))
        return self._submit(jobs)

    async def end(self) -> None:
        """Every stream's end marker: the target loads once all of them arrived."""
        await self.start_end().wait()

    def start_end(self) -> Pass:
        return self._submit([(index, _Job("end")) for index in range(self.count)])

    @property
    def _batch_pages(self) -> int:
        return self._threads[0]._batch_pages if self._threads else 1

    async def _run(self, jobs: list[tuple[int, _Job]]) -> None:
        await self._submit(jobs).wait()

    def _submit(self, jobs: list[tuple[int, _Job]]) -> Pass:
        pass_ = Pass(len(jobs), self._token)
        for index, job in jobs:
            job.report = pass_.report
            self._threads[index].submit(job)
        return pass_

    async def aclose(self) -> None:
        """Stop every stream now (a blocked send ends with the socket) and join the threads."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for thread in self._threads:
            try:
                thread.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.submit(None)

        def join() -> None:
            for thread in self._threads:
                thread.thread.join()
                thread.sock.close()
                thread.sender.release()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(join)

    async def finish(self) -> None:
        """After the migration's outcome: close the streams cleanly (no job is running)."""
        await self.aclose()
