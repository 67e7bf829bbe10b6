"""Bulk-copy bandwidth between two daemons on loopback, next to iperf3 in the same run; JSON out.

A 2 GiB guest whose every page is non-zero (the workload guest writes its whole working set once
at full speed, then idles) migrates from daemon A to daemon B; `bulk_mib_s` is what the source's
bulk copy moved (page data plus framing) divided by its duration. `iperf3_mib_s` is one iperf3
stream on loopback, measured just before. Both daemons, the guest and iperf3 share this machine's
cores.

Streams and the AEAD's cost: each repetition migrates once per number of data streams
(`--streams`, default 1, 2 and 4: migration.streams) with the AEAD on (peer.auth = "psk", the
default: every record sealed) and off (peer.auth = "none" with the test-only
allow_unauthenticated: frames in the clear), interleaved, so every setting meets the same
machine. `by_streams` holds each setting's median and runs; `aead_cost_percent` compares the
medians at the best stream count. `--pipeline` adds the old single-connection page path in one
process (PeerChannel, into warm memory) as it was measured before the data streams.

`cpu_s_per_gib` is each daemon's CPU time (all its threads) over the migration per GiB moved:
unlike MiB/s it barely moves when other work shares the cores. `--reference-repo DIR` migrates
with another checkout's daemons (DIR/.venv) too, interleaved setting by setting, and reports them
under `reference_by_streams` and `speedup_vs_reference`: before and after in the same run.

    python bench/stream.py [--memory-mib 2048] [--vcpus 1] [--seconds 5] [--repeat 2] [--streams 1,2,4]
                           [--reference-repo /work/main]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "migration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.py

from daemons import DaemonProcess, free_port, wait_for, wait_migration  # noqa: E402

MIB = 1 << 20


def iperf3_mib_s(seconds: float) -> float:
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        server.wait(timeout=10)
    result = json.loads(out)
    return float(result["end"]["sum_received"]["bits_per_second"]) / 8 / MIB


def warm_host_memory(gib: int) -> float:
    """Touch and free `gib` GiB so later allocations find memory the host has already backed.

    This machine is itself a guest: the first write to a never-used page of its RAM costs the
    outer hypervisor a fault, which shows up as the kernel's clear_page when the target daemon
    allocates guest RAM (63% of the target's CPU in `perf record` of a cold run). A long-running
    host has long since touched its memory; the bench warms it the same way first.
    """
    import numpy as np

    started = time.perf_counter()
    for _ in range(gib):
        block = np.ones(1 << 30, np.uint8)
        del block
    return time.perf_counter() - started


def pipeline_warm_mib_s(size: int = 1 << 30, aead: bool = True) -> float:
    """The same page path (framing, transport, PeerChannel over loopback TCP, send_range, apply)
    in one process into target memory that is already allocated: what the code moves when the
    target's page allocation is taken out (on this host that allocation is the bottleneck)."""
    import numpy as np
    import trio

    from migrated.migration.pagestream import StreamCounters, apply_batch, send_range
    from migrated.peer import PeerChannel
    from transport import Accept, Connection, PageBatch, Role, VmDescription

    auth: dict[str, Any] = {"psk": os.urandom(32)} if aead else {"allow_unauthenticated": True}
    source_ram = np.random.default_rng(0).integers(1, 255, size, dtype=np.uint8)
    target_ram = np.ones(size, np.uint8)  # touched: allocated before the clock starts
    elapsed = [0.0]

    async def run() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        done = trio.Event()

        async def target(stream: trio.SocketStream) -> None:
            channel = PeerChannel(stream, Connection(Role.TARGET, node="t", reuse_page_buffer=True, **auth))
            await channel.handshake()
            await channel.receive()
            await channel.send(Accept())
            view, received = target_ram.reshape(-1, 4096), 0
            while received < size // 4096:
                batch = await channel.receive()
                assert isinstance(batch, PageBatch)
                apply_batch(view, batch, True)
                received += batch.pages.size
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, target, listeners)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            channel = PeerChannel(stream, Connection(Role.SOURCE, node="s", **auth))
            await channel.handshake()
            await channel.send(
                VmDescription(
                    name="bench",
                    migration_id="bench",
                    memory=((0, 0, size),),
                    vcpus=1,
                    guest_kind="none",
                    cpu_features={},
                    dirty_tracking="ring",
                )
            )
            await channel.receive()
            started = time.perf_counter()
            await send_range(channel.send, source_ram.reshape(-1, 4096), 0, 0, 0, size // 4096, 2040, StreamCounters())
            await done.wait()
            elapsed[0] = time.perf_counter() - started
            nursery.cancel_scope.cancel()

    trio.run(run)
    if not np.array_equal(source_ram, target_ram):
        raise RuntimeError("the pipeline corrupted pages")
    return size / MIB / elapsed[0]


def aead_core_mib_s(batch: int = 8 * MIB, count: int = 32) -> dict[str, float]:
    """One core sealing and opening whole batches (transport/seal.py), next to a plain copy of
    the same bytes: the AEAD's own price per byte, free of the link and the other process."""
    import numpy as np

    from transport import Role, seal

    key = seal.derive_key(os.urandom(32), os.urandom(32), os.urandom(32), Role.SOURCE)
    data = memoryview(np.random.default_rng(1).integers(0, 255, batch, dtype=np.uint8).data)
    header = b"h" * 40
    sealer, opener = seal.Sealer(key), seal.Opener(key, batch + 4096, reuse=True)
    copy_to = bytearray(batch)

    def timed(step: Any) -> float:
        step()  # warm: buffers allocated and touched
        started = time.perf_counter()
        for _ in range(count):
            step()
        return count * batch / MIB / (time.perf_counter() - started)

    sealed = timed(lambda: sealer.seal([header, data]))
    # Records for the opener, sealed afresh from sequence 0 (untimed).
    source = seal.Sealer(key)
    records = [b"".join(bytes(part) for part in source.seal([header, data])) for _ in range(count + 1)]

    def open_one() -> None:
        record = memoryview(records.pop(0))
        opener.feed(record[: seal.LENGTH.size])
        assert opener.next_frame() is None
        opener.receive_buffer()[:] = record[seal.LENGTH.size :]  # where recv_into would land
        opener.received(len(record) - seal.LENGTH.size)
        assert opener.next_frame() is not None

    opened = timed(open_one)
    copied = timed(lambda: copy_to.__setitem__(slice(None), data))
    return {"seal_mib_s": sealed, "open_mib_s": opened, "memcpy_mib_s": copied}


def reference_wrapper(repo: Path | None) -> tuple[str, ...]:
    """Runs a daemon from another checkout (its own venv, its code first on the path) in place of
    this one's: `sh` drops the interpreter path DaemonProcess puts first and execs the other."""
    if repo is None:
        return ()
    script = 'shift; cd "$0" && export PYTHONPATH="$0" && exec "$0/.venv/bin/python" "$@"'
    return ("sh", "-c", script, str(repo))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a whole process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def migrate_once(
    memory_mib: int,
    vcpus: int,
    pause_guest: bool,
    aead: bool = True,
    streams: int = 2,
    repo: Path | None = None,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="migrated-bench-"))
    key = work / "peer.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    config = work / "peer.toml"
    config.write_text("" if aead else '[peer]\nauth = "none"\nallow_unauthenticated = true\n')
    extra = ("--config", str(config))
    wrapper = reference_wrapper(repo)
    a = DaemonProcess("a", work, key, extra_args=extra, wrapper=wrapper).start()
    b = DaemonProcess("b", work, key, extra_args=extra, wrapper=wrapper).start()
    try:
        working_set = memory_mib - 8  # all but the guest's own metadata
        a.call(
            "vm.create",
            name="bench",
            memory_mib=memory_mib,
            vcpus=vcpus,
            dirty_rate_mib_s="max",
            working_set_mib=working_set,
        )
        pages = working_set * MIB // 4096
        wait_for(
            lambda: a.call("vm.show", name="bench")["guest"]["pages_written"] >= pages,
            timeout=120,
            what="the guest to write its whole working set",
        )
        a.call("vm.set", name="bench", dirty_rate_mib_s=0)
        if pause_guest:
            a.call("vm.pause", name="bench")
        assert a.process is not None and b.process is not None
        pids = {"source": a.process.pid, "target": b.process.pid}
        before = {side: cpu_seconds(pid) for side, pid in pids.items()}
        a.call("migrate", name="bench", to=b.address, verify="off", streams=streams)
        stats = wait_migration(a, "bench", timeout=300)
        if stats["state"] != "completed":
            raise RuntimeError(f"migration did not complete: {stats}")
        # CPU per GiB moved, whole daemon (every thread; the guest is paused): what a copy costs
        # does not depend on what else shares the cores, unlike its MiB/s.
        gib = float(stats["bulk_bytes"]) / (1 << 30)
        stats["cpu_s_per_gib"] = {side: (cpu_seconds(pid) - before[side]) / gib for side, pid in pids.items()}
        return stats
    finally:
        a.stop()
        b.stop()


def bulk_mib_s(stats: dict[str, Any]) -> float:
    return float(stats["bulk_bytes"]) / MIB / (float(stats["bulk_ms"]) / 1e3)


def summarize(runs: dict[tuple[str, int, bool], list[dict[str, Any]]], name: str, counts: list[int]) -> dict[str, Any]:
    """One variant's medians and runs per stream count, AEAD on and off."""
    out: dict[str, Any] = {}
    for n in counts:
        bulk = {aead: [bulk_mib_s(stats) for stats in runs[(name, n, aead)]] for aead in (True, False)}
        cpu = {
            aead: {
                side: statistics.median(stats["cpu_s_per_gib"][side] for stats in runs[(name, n, aead)])
                for side in ("source", "target")
            }
            for aead in (True, False)
        }
        out[str(n)] = {
            "aead_on_mib_s": statistics.median(bulk[True]),
            "aead_off_mib_s": statistics.median(bulk[False]),
            "runs": {"aead_on": bulk[True], "aead_off": bulk[False]},
            "downtime_ms": [stats["downtime_ms"] for stats in runs[(name, n, True)]],
            "cpu_s_per_gib": {"aead_on": cpu[True], "aead_off": cpu[False]},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mib", type=int, default=2048)
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration")
    parser.add_argument("--warm-gib", type=int, default=8, help="host memory to touch first")
    parser.add_argument("--repeat", type=int, default=2, help="migrations per AEAD setting, alternating")
    parser.add_argument(
        "--pause-guest", action="store_true", help="pause the guest during the copy (its idle loop spins a core)"
    )
    parser.add_argument("--streams", default="1,2,4", help="data stream counts to compare, comma-separated")
    parser.add_argument("--pipeline", action="store_true", help="also the old one-connection path in one process")
    parser.add_argument(
        "--reference-repo",
        type=Path,
        default=None,
        help="another checkout (with its .venv) whose daemons migrate interleaved with ours, as the "
        "reference of the same run (default: none)",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    warm_s = warm_host_memory(args.warm_gib)
    iperf = [iperf3_mib_s(args.seconds)]
    aead_core = aead_core_mib_s()
    repos: dict[str, Path | None] = {"ours": None}
    if args.reference_repo is not None:
        repos["reference"] = args.reference_repo.resolve()
    runs: dict[tuple[str, int, bool], list[dict[str, Any]]] = {
        (name, n, aead): [] for name in repos for n in counts for aead in (True, False)
    }
    pipelines: dict[bool, list[float]] = {True: [], False: []}
    turn = 0
    for _ in range(args.repeat):
        for n in counts:
            for aead in (False, True):
                # Interleaved, and who goes first alternates: both meet the same machine, and
                # neither always gets the memory the other just freed.
                order = list(repos.items())
                turn += 1
                for name, repo in order[turn % len(order) :] + order[: turn % len(order)]:
                    stats = migrate_once(args.memory_mib, args.vcpus, args.pause_guest, aead, n, repo)
                    runs[(name, n, aead)].append(stats)
            if args.pipeline:
                for aead in (False, True):
                    pipelines[aead].append(pipeline_warm_mib_s(aead=aead))
        iperf.append(iperf3_mib_s(args.seconds))  # between repetitions: the reference moves too
    by_variant = {name: summarize(runs, name, counts) for name in repos}
    by_streams = by_variant["ours"]
    best = max(counts, key=lambda n: by_streams[str(n)]["aead_on_mib_s"])
    on, off = by_streams[str(best)]["aead_on_mib_s"], by_streams[str(best)]["aead_off_mib_s"]
    iperf_median = statistics.median(iperf)
    last = runs[("ours", best, True)][-1]
    result: dict[str, Any] = {
        "bulk_mib_s": on,
        "bulk_mib_s_aead_off": off,
        "best_streams": best,
        "aead_cost_percent": 100 * (off - on) / off,
        "by_streams": by_streams,
        "iperf3_mib_s": iperf_median,
        "iperf3_runs_mib_s": iperf,
        "aead_one_core": aead_core,
        "ratio": on / iperf_median,
        "at_least_iperf3": on >= iperf_median,
        "bulk_bytes": last["bulk_bytes"],
        "bulk_ms": last["bulk_ms"],
        "guest_memory_mib": args.memory_mib,
        "guest_vcpus": args.vcpus,
        "guest_paused_during_copy": args.pause_guest,
        "warmed_host_gib": args.warm_gib,
        "warm_s": warm_s,
        "zero_pages": last["zero_pages"],
        "total_ms": last["total_ms"],
        "repeat": args.repeat,
    }
    if "reference" in by_variant:
        reference = by_variant["reference"]
        result["reference_repo"] = str(repos["reference"])
        result["reference_by_streams"] = reference
        result["speedup_vs_reference"] = {
            n: {
                setting: by_streams[n][f"{setting}_mib_s"] / reference[n][f"{setting}_mib_s"]
                for setting in ("aead_on", "aead_off")
            }
            for n in by_streams
        }
    if args.pipeline:
        pipe_on, pipe_off = statistics.median(pipelines[True]), statistics.median(pipelines[False])
        result["pipeline_warm_target_mib_s"] = pipe_on
        result["pipeline_warm_target_mib_s_aead_off"] = pipe_off
        result["pipeline_runs"] = {"aead_on": pipelines[True], "aead_off": pipelines[False]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
