"""Where the data plane's CPU goes, per GiB, per thread: the real stream threads in one process.

The source's stream threads (sendstreams.py) send a RAM file of non-zero pages over loopback TCP
to the target's receive threads (recvstreams.py), which pwrite it into a fresh RAM file, as in a
migration's bulk copy. Each step the threads take is wrapped in a timer of its own thread's CPU
time (`time.thread_time`): the zero scan, encoding and sealing, `sendmsg`, `recv_into`, opening
(decrypting) and decoding, applying (`pwrite`), and each thread's total; what the total holds
beyond its steps is the Python around them. CPU seconds per GiB do not depend much on what else
shares the cores; `mib_s` does. The pages are checked at the end.

With a RAM file larger than the memory this nested host keeps backed (HOST-NOTES.md: fresh
memory), `apply` shows the outer host's first-touch cost: run it at 1 and at 2+ GiB.

    python bench/dataplane_cpu.py [--gib 1] [--aead 1] [--streams 1] [--batch-mib 8] [--repo DIR]
                                  [--backing memfd|shmem-huge|hugetlbfs]

`--backing` chooses what holds both RAM files, as `vm.memory_backing` does: "shmem-huge" on a
private tmpfs mounted with huge=within_size for the run (root), "hugetlbfs" from the pool in
/proc/sys/vm/nr_hugepages (reserve twice `--gib` first). `--warm` writes and frees as much
anonymous memory just before the target's RAM file is made: the outer host then backs the pages
the copy fills, as a host in service does; without it they may be cold, and `apply` swings 10x.

Two facts the data plane's choices rest on, each measured alone (no streams) by its own flag:
`--aead-sizes` is what seal.py's AES-256-GCM calls move per CPU-second by record size (64 KiB to
8 MiB: the batch size); `--fresh-writes` is what 1 GiB of received data costs to land in a fresh
memfd by each way the target could write it: pwrite (what recvstreams.py does), a mapping
populated with MADV_POPULATE_WRITE just ahead of the copy in the same thread, or the mapping's
own faults (what receiving straight into guest RAM and decrypting there would cost).
`--splice-receive` prices a receiver that skips the user-space copy (a prototype, not the data
plane: it would need a separately authenticated header record, a protocol change): 8 MiB sealed
records spliced from the socket into a fresh RAM file and decrypted in place through its mapping
(tag checked last), against today's recv_into, decrypt_into in place, pwrite; the receiving
thread's CPU per GiB, interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from streampairs import loopback_pairs, receive_threads

PAGE = 4096
GIB = 1 << 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="RAM file size (default: 1)")
    parser.add_argument("--aead", type=int, default=1, help="1: sealed records (psk), 0: clear (default: 1)")
    parser.add_argument("--streams", type=int, default=1, help="data streams (default: 1)")
    parser.add_argument("--batch-mib", type=float, default=8, help="migration.max_batch_bytes in MiB (default: 8)")
    parser.add_argument(
        "--repo", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to profile (default: this)"
    )
    parser.add_argument("--aead-sizes", action="store_true", help="only AES-GCM CPU cost per record size")
    parser.add_argument("--fresh-writes", action="store_true", help="only the ways to write a fresh memfd")
    parser.add_argument("--splice-receive", action="store_true", help="only the splice receiver prototype")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of those three (default: 3)")
    parser.add_argument(
        "--warm", action="store_true", help="write and free the target's size in memory just before the copy"
    )
    parser.add_argument(
        "--backing", default="memfd", choices=("memfd", "shmem-huge", "hugetlbfs"), help="what holds both RAM files"
    )
    args = parser.parse_args()
    if args.aead_sizes:
        print(json.dumps(aead_sizes(args.rounds), indent=2))
        return
    if args.fresh_writes:
        print(json.dumps(fresh_writes(args.gib, args.rounds), indent=2))
        return
    if args.splice_receive:
        print(json.dumps(splice_receive(args.gib, args.rounds), indent=2))
        return
    sys.path.insert(0, str(args.repo))

    from migrated.kvm.memory import GuestMemory

    size = int(args.gib * GIB) // PAGE * PAGE
    with ram_backing(args.backing) as backing:
        source = GuestMemory.flat(size, name="bench-source", backing=backing)
        source.bytes[:] = 0x5A
        if args.warm:
            warm_host_memory(size)
        target = GuestMemory.flat(size, name="bench-target", backing=backing)
        try:
            copy(args, source, target, size)
        finally:
            source.close()
            target.close()


def warm_host_memory(size: int) -> None:
    """Write and free a little more than `size` bytes of anonymous memory: the target's RAM is
    then made of pages the outer host backs now, as on a host in service (HOST-NOTES.md: this
    nested host hands unused memory back to its own host within seconds)."""
    import numpy as np

    block = np.empty(size + size // 4, dtype=np.uint8)
    block.fill(1)
    del block


@contextlib.contextmanager
def ram_backing(kind: str) -> Iterator[Any]:
    """The RamBacking of `kind`; for "shmem-huge", on a private huge-page tmpfs for the run."""
    from migrated.kvm.backing import RamBacking

    if kind == "memfd":
        yield RamBacking("memfd")
        return
    if kind == "hugetlbfs":
        yield RamBacking("hugetlbfs")
        return
    directory = tempfile.mkdtemp(prefix="dataplane-cpu-ram-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "huge=within_size,mode=0700", "tmpfs", directory], check=True)
    try:
        yield RamBacking("shmem-huge", directory)
    finally:
        subprocess.run(["umount", directory], check=True)
        os.rmdir(directory)


def copy(args: argparse.Namespace, source: Any, target: Any, size: int) -> None:
    """The copy itself, timed step by step, and its JSON."""
    import numpy as np

    from migrated.migration import recvstreams, sendstreams
    from migrated.migration.ratelimit import TokenBucket
    from transport.datastream import DataReceiver, DataSender, Layout

    cpu: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def timed(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            started = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                cpu[threading.current_thread().name][step] += time.thread_time() - started

        return wrapper

    sendstreams._split_zero = timed("zero_scan", sendstreams._split_zero)  # type: ignore[attr-defined]
    DataSender.batch = timed("encode_seal", DataSender.batch)  # type: ignore[method-assign]
    DataReceiver.next_event = timed("open_decode", DataReceiver.next_event)  # type: ignore[method-assign]
    recvstreams._Applier.apply = timed("apply_pwrite", recvstreams._Applier.apply)  # type: ignore[attr-defined]
    sendstreams._StreamThread._run = timed("total", sendstreams._StreamThread._run)  # type: ignore[attr-defined]
    recvstreams._ReceiveThread._run = timed("total", recvstreams._ReceiveThread._run)  # type: ignore[attr-defined]

    class TimedSocket:
        """The socket, its data calls timed (the stream threads take it as it is)."""

        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock
            self.sendmsg = timed("sendmsg", sock.sendmsg)
            self.recv_into = timed("recv_into", sock.recv_into)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sock, name)

    pages = source.regions[0].pages
    batch_bytes = int(args.batch_mib * (1 << 20))
    batch_pages = max(1, batch_bytes // (PAGE + 16))  # as source.batch_pages_for
    layout = Layout({0: pages}, PAGE, batch_bytes)
    secret = os.urandom(32)
    sealed = bool(args.aead)

    pairs = loopback_pairs(args.streams)
    errors: list[object] = []
    finished = threading.Semaphore(0)
    receivers = receive_threads(
        pairs,
        target,
        lambda index: DataReceiver(secret, index, layout, sealed=sealed),
        finished.release,
        errors.append,
        wrap=TimedSocket,
    )
    started = time.perf_counter()
    stop = threading.Event()
    senders = []
    for index, (client, _) in enumerate(pairs):
        thread = sendstreams._StreamThread(  # type: ignore[attr-defined]
            TimedSocket(client),
            DataSender(secret, index, layout, sealed=sealed),
            source,
            batch_pages,
            TokenBucket(0, stop),
            stop,
        )
        runs = sendstreams.chunk_runs([(0, pages)], index, args.streams, batch_pages)
        report = lambda error: error and errors.append(error)  # noqa: E731
        thread.submit(sendstreams._Job("ranges", slot=0, round=0, ranges=runs, report=report))  # type: ignore[attr-defined]
        thread.submit(sendstreams._Job("end", report=report))  # type: ignore[attr-defined]
        thread.submit(None)
        senders.append(thread)
    for _ in range(args.streams):
        finished.acquire()
    elapsed = time.perf_counter() - started
    for thread in [*senders, *receivers]:
        thread.thread.join()
    if errors:
        raise SystemExit(f"the copy failed: {errors}")
    if not np.array_equal(source.bytes, target.bytes):
        raise SystemExit("the target's pages differ from the source's")
    gib = size / GIB
    print(
        json.dumps(
            {
                "repo": str(args.repo),
                "gib": gib,
                "aead": sealed,
                "backing": args.backing,
                "warm": args.warm,
                "streams": args.streams,
                "batch_mib": args.batch_mib,
                "mib_s": size / (1 << 20) / elapsed,
                "cpu_s_per_gib": {
                    name: {step: round(seconds / gib, 3) for step, seconds in steps.items()}
                    for name, steps in sorted(cpu.items())
                },
            },
            indent=2,
        )
    )


def aead_sizes(rounds: int) -> dict[str, Any]:
    """GB per CPU-second of one record's seal (streaming update_into into a reused buffer, as
    seal.Sealer) and open (decrypt_into a reused buffer; seal.Opener decrypts in place), by record size, best of
    `rounds`; 256 MiB per size and round."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, total = os.urandom(32), 256 << 20
    out: dict[str, Any] = {"key_bits": 256, "unit": "GB per CPU-second, best of rounds"}
    for kib in (64, 256, 1024, 2048, 8192):
        size = kib << 10
        plain, sealed = bytearray(os.urandom(size)), bytearray(size + 16)
        record = bytearray(AESGCM(key).encrypt(bytes(12), bytes(plain), b"len!"))
        opened = bytearray(size)  # apart, not in place: the record must stay sealed for the next call
        best = {"seal": 0.0, "open": 0.0}
        for _ in range(rounds):
            started = time.thread_time()
            for sequence in range(total // size):
                encryptor = Cipher(algorithms.AES(key), modes.GCM(sequence.to_bytes(12, "big"))).encryptor()
                encryptor.authenticate_additional_data(b"len!")
                encryptor.update_into(plain, sealed)
                encryptor.finalize()
            best["seal"] = max(best["seal"], total / (time.thread_time() - started) / 1e9)
            aead, started = AESGCM(key), time.thread_time()
            for _ in range(total // size):
                aead.decrypt_into(bytes(12), record, b"len!", opened)
            best["open"] = max(best["open"], total / (time.thread_time() - started) / 1e9)
        out[f"{kib}_kib"] = {step: round(value, 2) for step, value in best.items()}
    return out


def fresh_writes(gib: float, rounds: int) -> dict[str, Any]:
    """CPU-seconds per GiB (and GB/s) to write `gib` GiB in 8 MiB blocks into a fresh memfd, by
    way of writing; the ways take turns, round by round, so each meets the host alike."""
    import mmap

    import numpy as np

    size, block_bytes = int(gib * GIB) // PAGE * PAGE, 8 << 20
    block = np.full(block_bytes, 0x5A, np.uint8)
    populate_write = getattr(mmap, "MADV_POPULATE_WRITE", 23)

    def once(way: str) -> tuple[float, float]:
        fd = os.memfd_create("bench-fresh")
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size, mmap.MAP_SHARED) as mapping:
                ram = np.frombuffer(mapping, np.uint8)
                cpu, wall = time.thread_time(), time.perf_counter()
                for offset in range(0, size, block_bytes):
                    n = min(block_bytes, size - offset)
                    if way == "pwrite":
                        os.pwrite(fd, block[:n], offset)
                    else:
                        if way == "populate_then_copy":
                            mapping.madvise(populate_write, offset, n)
                        ram[offset : offset + n] = block[:n]
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                del ram
            return cpu, wall
        finally:
            os.close(fd)

    ways = ("pwrite", "populate_then_copy", "fault_then_copy")
    runs: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            runs[way].append(once(way))
    return {
        "gib": size / GIB,
        **{
            way: {
                "cpu_s_per_gib": [round(cpu / (size / GIB), 3) for cpu, _ in results],
                "gb_s": [round(size / wall / 1e9, 2) for _, wall in results],
            }
            for way, results in runs.items()
        },
    }


def splice_receive(gib: float, rounds: int) -> dict[str, Any]:
    """The receiving thread's CPU-seconds per GiB (and MiB/s) for 8 MiB sealed records into a
    fresh memfd: "today" (recv_into a buffer, decrypt_into in place, pwrite) against "splice"
    (socket -> pipe -> RAM file, then streaming GCM in place through the mapping, tag last). A
    sender thread sends the same sealed record over loopback TCP; the last record is checked."""
    import fcntl
    import mmap

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    record_bytes, tag_bytes, piece = 8 << 20, 16, 1 << 20
    key, nonce = os.urandom(32), bytes(12)
    plain = os.urandom(record_bytes)
    record = AESGCM(key).encrypt(nonce, plain, None)
    count = max(1, int(gib * GIB) // record_bytes)

    def recv_exactly(sock: socket.socket, view: memoryview) -> None:
        got = 0
        while got < view.nbytes:
            n = sock.recv_into(view[got:])
            if not n:
                raise SystemExit("the sender closed early")
            got += n

    def today(sock: socket.socket, fd: int, ram: memoryview) -> None:
        buffer = memoryview(bytearray(record_bytes + tag_bytes))
        aead = AESGCM(key)
        for index in range(count):
            recv_exactly(sock, buffer)
            aead.decrypt_into(nonce, buffer, None, buffer[:record_bytes])
            data, offset = buffer[:record_bytes], index * record_bytes
            while data.nbytes:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written

    def spliced(sock: socket.socket, fd: int, ram: memoryview) -> None:
        pipe_r, pipe_w = os.pipe()
        try:
            fcntl.fcntl(pipe_w, 1031, piece)  # F_SETPIPE_SZ
            tag = bytearray(tag_bytes)
            for index in range(count):
                base = offset = index * record_bytes
                while offset < base + record_bytes:
                    moved = os.splice(sock.fileno(), pipe_w, min(piece, base + record_bytes - offset))
                    if not moved:
                        raise SystemExit("the sender closed early")
                    while moved:
                        landed = os.splice(pipe_r, fd, moved, offset_dst=offset)
                        moved, offset = moved - landed, offset + landed
                recv_exactly(sock, memoryview(tag))
                decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
                for start in range(base, base + record_bytes, piece):  # the mapping has a spare page
                    decryptor.update_into(ram[start : start + piece], ram[start : start + piece + 15])
                decryptor.finalize_with_tag(bytes(tag))
        finally:
            os.close(pipe_r)
            os.close(pipe_w)

    def once(receive: Callable[[socket.socket, int, memoryview], None]) -> tuple[float, float]:
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server = listener.accept()[0]
        listener.close()
        fd = os.memfd_create("bench-splice")
        size = count * record_bytes + PAGE
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
        ram = memoryview(mapping)

        def send() -> None:
            for _ in range(count):
                client.sendall(record)

        sender = threading.Thread(target=send)
        try:
            cpu, wall = time.thread_time(), time.perf_counter()
            sender.start()
            receive(server, fd, ram)
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            sender.join()
            last = (count - 1) * record_bytes
            if bytes(ram[last : last + record_bytes]) != plain:
                raise SystemExit(f"{receive.__name__}: the last record's pages differ")
        finally:
            ram.release()
            mapping.close()
            os.close(fd)
            server.close()
            client.close()
        return cpu, wall

    runs: dict[str, list[tuple[float, float]]] = {"today": [], "splice": []}
    for _ in range(rounds):
        runs["today"].append(once(today))
        runs["splice"].append(once(spliced))
    moved_gib = count * record_bytes / GIB
    return {
        "gib": moved_gib,
        **{
            way: {
                "receiver_cpu_s_per_gib": [round(cpu / moved_gib, 3) for cpu, _ in results],
                "mib_s": [round(moved_gib * 1024 / wall) for _, wall in results],
            }
            for way, results in runs.items()
        },
    }


if __name__ == "__main__":
    main()
