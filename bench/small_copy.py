"""The bulk copy of a small guest, alone: a few MiB over fresh data streams, the real stream threads
of both sides in one process; JSON out.

What a migration of the boot-sector guest pays between its first page sent and its pause
(`bulk_send` and `streams_drained` in the stats): each trial opens fresh loopback connections, a
fresh sender and receiver per stream (fresh AEAD keys, record buffers as the daemon gets them)
and a fresh target RAM file (150 MiB, or what the copy needs); the source's RAM file holds
`--mib` MiB of non-zero pages in two extents, as that guest's does. `sent_ms` is from the jobs
handed to the stream threads until every thread reported them sent (the source's `bulk_send`);
`drained_ms` until every receive thread applied its stream's end marker (what the source's
`streams_drained` waits for, without the control round trip). The target's pages are checked.
Between trials the allocator returns freed memory to the kernel (`malloc_trim`), as glibc does
with large freed buffers, unless `--warm`. `--gil-hog` runs a thread of pure Python beside the
streams (the worst case of a daemon's other threads: every GIL hand-over waits for it).

`--reference DIR` runs the same trials with another checkout's data plane (DIR/.venv), the two
alternating round by round, so both meet the same machine; `--trace` prints one trial's events
(per batch: sealed, sent, opened, applied) for each size instead.

    python bench/small_copy.py [--mib 1,3,7] [--streams 2] [--trials 10] [--rounds 3] [--reference DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streampairs import loopback_pairs, receive_threads

PAGE = 4096
MIB = 1 << 20
RAM_MIB = 150
BATCH_BYTES = 8 * MIB  # migration.max_batch_bytes' default


def _extents(mib: float) -> list[tuple[int, int]]:
    """Page ranges like the boot-sector guest's: its first 64 KiB, and the rest from 1 MiB up."""
    pages = max(32, int(mib * MIB) // PAGE)
    return [(0, 16), (256, 256 + pages - 16)]


def _hog() -> None:
    """Python code that never blocks: every stream thread that released the GIL (a send, a
    receive, the AEAD, a pwrite) waits for this one to give it back (up to the switch interval)."""
    count = 0
    while True:
        count += 1


def trials(
    repo: Path, sizes: list[float], streams: int, count: int, trace: bool, fresh: bool, gil_hog: bool
) -> dict[str, Any]:
    """`count` trials of each size with `repo`'s data plane, in this process."""
    if gil_hog:
        threading.Thread(target=_hog, daemon=True).start()
    sys.path.insert(0, str(repo))
    libc = ctypes.CDLL(None)
    import numpy as np

    from migrated.kvm.memory import GuestMemory
    from migrated.migration import recvstreams, sendstreams
    from migrated.migration.ratelimit import TokenBucket
    from transport.datastream import DataReceiver, DataSender, Layout

    try:  # the daemon's pool of record buffers, where the checkout has one
        from migrated.migration.recordbuffers import RECORD_BUFFERS

        pooled: dict[str, Any] = {"buffers": RECORD_BUFFERS}
    except ImportError:
        pooled = {}

    events: list[tuple[float, str, str]] = []

    def traced(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            result = fn(*a, **k)
            events.append((time.perf_counter(), threading.current_thread().name, step))
            return result

        return wrapper

    if trace:
        DataSender.batch = traced("sealed", DataSender.batch)  # type: ignore[method-assign]
        sendstreams._StreamThread._send_batch = traced("sent", sendstreams._StreamThread._send_batch)  # type: ignore[attr-defined]
        DataReceiver.next_event = traced("opened", DataReceiver.next_event)  # type: ignore[method-assign]
        recvstreams._Applier.apply = traced("applied", recvstreams._Applier.apply)  # type: ignore[attr-defined]

    size = max(RAM_MIB, int(max(sizes)) + 2) * MIB  # the boot-sector guest's, or what the copy needs
    source = GuestMemory.flat(size, name="bench-source")
    batch_pages = max(1, BATCH_BYTES // (PAGE + 16))  # as outgoing_setup.batch_pages_for
    layout = Layout({0: size // PAGE}, PAGE, BATCH_BYTES)
    out: dict[str, Any] = {}
    rng = np.random.default_rng(1)
    # Every trial releases these exactly as often as it acquires them: they start each one at 0.
    errors: list[object] = []
    sent, drained = threading.Semaphore(0), threading.Semaphore(0)

    def report(error: BaseException | None) -> None:
        if error is not None:
            errors.append(error)
        sent.release()

    for mib in sizes:
        extents = _extents(mib)
        ram = source.bytes.reshape(-1, PAGE)
        for first, end in extents:
            ram[first:end] = rng.integers(1, 255, size=(end - first, PAGE), dtype=np.uint8)
        results: list[dict[str, float]] = []
        for _ in range(count):
            events.clear()
            if fresh:
                libc.malloc_trim(0)
            target = GuestMemory.flat(size, name="bench-target")
            secret = os.urandom(32)
            pairs = loopback_pairs(streams)
            receivers = receive_threads(
                pairs,
                target,
                lambda index, secret=secret: DataReceiver(secret, index, layout, sealed=True, **pooled),
                drained.release,
                errors.append,
            )
            stop = threading.Event()
            senders = [
                sendstreams._StreamThread(  # type: ignore[attr-defined]
                    client,
                    DataSender(secret, index, layout, sealed=True, **pooled),
                    source,
                    batch_pages,
                    TokenBucket(0, stop),
                    stop,
                )
                for index, (client, _) in enumerate(pairs)
            ]
            started = time.perf_counter()
            jobs = 0
            for index, thread in enumerate(senders):
                runs = sendstreams.chunk_runs(extents, index, streams, batch_pages)
                if runs:
                    thread.submit(sendstreams._Job("ranges", slot=0, round=0, ranges=runs, report=report))  # type: ignore[attr-defined]
                    jobs += 1
            for _ in range(jobs):
                sent.acquire()
            sent_at = time.perf_counter()
            for thread in senders:
                thread.submit(sendstreams._Job("end"))  # type: ignore[attr-defined]
                thread.submit(None)
            for _ in range(streams):
                drained.acquire()
            drained_at = time.perf_counter()
            for thread in [*senders, *receivers]:
                thread.thread.join()
            for client, server in pairs:
                client.close()
                server.close()
            for thread in senders:
                thread.sender.release()
            for receiver in receivers:
                receiver.receiver.release()
            if errors:
                raise SystemExit(f"the copy failed: {errors}")
            for first, end in extents:
                if not np.array_equal(
                    source.bytes.reshape(-1, PAGE)[first:end], target.bytes.reshape(-1, PAGE)[first:end]
                ):
                    raise SystemExit("the target's pages differ from the source's")
            target.close()
            results.append({"sent_ms": (sent_at - started) * 1e3, "drained_ms": (drained_at - started) * 1e3})
            if trace:
                out[f"{mib:g}_mib_trace"] = [
                    f"{(at - started) * 1e3:7.2f} ms {name} {step}" for at, name, step in events
                ]
                break
        out[f"{mib:g}"] = results
    source.close()
    return out


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", default="1,3,7", help="MiB of data per copy, comma-separated (default: 1,3,7)")
    parser.add_argument("--streams", type=int, default=2, help="data streams (default: 2)")
    parser.add_argument("--trials", type=int, default=10, help="copies per size and round (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating checkouts (default: 3)")
    parser.add_argument("--reference", type=Path, help="another checkout, run interleaved with this one")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--warm", action="store_true", help="keep freed buffers in the allocator between trials (default: trimmed)"
    )
    parser.add_argument(
        "--gil-hog",
        action="store_true",
        help="a thread running Python code beside the streams, as a daemon's others do",
    )
    parser.add_argument("--trace", action="store_true", help="one trial's events per size, this checkout only")
    args = parser.parse_args()
    sizes = [float(x) for x in args.mib.split(",")]
    if args.child or args.trace:
        print(
            json.dumps(
                trials(args.repo, sizes, args.streams, args.trials, args.trace, not args.warm, args.gil_hog), indent=1
            )
        )
        return
    checkouts = {"this": Path(__file__).resolve().parents[1]}
    if args.reference is not None:
        checkouts["reference"] = args.reference.resolve()
    collected: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in checkouts}
    for _ in range(args.rounds):
        for name, repo in checkouts.items():
            python = repo / ".venv" / "bin" / "python"
            command = [str(python), __file__, "--child", "--repo", str(repo), "--mib", args.mib]
            command += (
                ["--streams", str(args.streams), "--trials", str(args.trials)]
                + ["--warm"] * args.warm
                + ["--gil-hog"] * args.gil_hog
            )
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            for mib, runs in result.items():
                collected[name].setdefault(mib, []).extend(runs)
    report: dict[str, Any] = {
        "load": os.getloadavg(),
        "streams": args.streams,
        "ram_mib": max(RAM_MIB, int(max(sizes)) + 2),
    }
    for name, by_size in collected.items():
        report[name] = {
            mib: {key: spread([r[key] for r in runs]) for key in ("sent_ms", "drained_ms")} | {"n": len(runs)}
            for mib, runs in by_size.items()
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
