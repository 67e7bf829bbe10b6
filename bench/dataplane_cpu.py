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
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))

    import numpy as np

    from migrated.kvm.memory import GuestMemory
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

    size = int(args.gib * GIB) // PAGE * PAGE
    source = GuestMemory.flat(size, name="bench-source")
    source.bytes[:] = 0x5A
    target = GuestMemory.flat(size, name="bench-target")
    pages = source.regions[0].pages
    batch_bytes = int(args.batch_mib * (1 << 20))
    batch_pages = max(1, batch_bytes // (PAGE + 16))  # as source.batch_pages_for
    layout = Layout({0: pages}, PAGE, batch_bytes)
    secret = os.urandom(32)
    sealed = bool(args.aead)

    listener = socket.create_server(("127.0.0.1", 0))
    pairs = []
    for _ in range(args.streams):
        client = socket.create_connection(listener.getsockname())
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pairs.append((client, listener.accept()[0]))
    listener.close()

    errors: list[object] = []
    finished = threading.Semaphore(0)
    applier = recvstreams._Applier(target)  # type: ignore[attr-defined]
    receivers = [
        recvstreams._ReceiveThread(  # type: ignore[attr-defined]
            TimedSocket(server),
            DataReceiver(secret, index, layout, sealed=sealed),
            applier,
            60.0,
            lambda index: finished.release(),
            lambda index, message: (errors.append(message), finished.release()),
        )
        for index, (_, server) in enumerate(pairs)
    ]
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


if __name__ == "__main__":
    main()
