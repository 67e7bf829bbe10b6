"""Soak (issue 11 item 6): many ping-pong migrations of one VM with the daemons' fds, threads and
RSS sampled after each, and four VMs migrating at once in both directions; JSON and an SVG plot.

    python bench/soak.py [--migrations 100] [--out-dir bench/out]

Samples come from /proc after each migration has settled: open fds, threads (idle workers of
trio's thread cache, named "Trio thread N" and gone after 10 s idle, are counted apart: they
come and go with load, not with leaks) and RSS. The first two round trips warm up (lazy imports,
the first incoming VM); their last samples are the baselines: after every later round trip each
daemon must be back at exactly its baseline fds and threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "migration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.py

from daemons import DaemonProcess, wait_for, wait_migration  # noqa: E402
from soakplot import write_svg  # noqa: E402

WARMUP_MIGRATIONS = 4
SETTLE_S = 20.0
STABLE_S = 1.0
VM = {"memory_mib": 256, "vcpus": 2, "dirty_rate_mib_s": 32, "working_set_mib": 64}
SMALL_VM = {"memory_mib": 128, "vcpus": 2, "dirty_rate_mib_s": 16, "working_set_mib": 32}


def resources(pid: int) -> dict[str, int]:
    """fds, threads (without idle trio cache workers), idle cache workers, RSS in KiB."""
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{task}/comm").read_text().strip())
        except OSError:
            continue  # the thread ended while we looked
    idle = sum(1 for name in names if name.startswith("Trio thread"))
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS")
    )
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(names) - idle,
        "idle_pool_threads": idle,
        "rss_kib": rss,
    }


def settled(daemon: DaemonProcess, expected: dict[str, int] | None) -> dict[str, int]:
    """The daemon's resources once they stopped moving, or as soon as they equal `expected`.

    "completed" is published before the released VM is closed (its fds, vCPU threads and the
    kernel's per-VM thread go in a worker thread after it), so a sample at once would count a
    teardown in progress. Stopped moving: the same fds and threads for STABLE_S."""
    assert daemon.process is not None
    deadline = time.monotonic() + SETTLE_S
    last = resources(daemon.process.pid)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = resources(daemon.process.pid)
        if expected is not None:
            if all(now[k] == expected[k] for k in ("fds", "threads")):
                return now
        elif any(now[k] != last[k] for k in ("fds", "threads")):
            stable_since = time.monotonic()
        elif time.monotonic() - stable_since >= STABLE_S:
            return now
        last = now
    return last


def guest_ok(daemon: DaemonProcess, name: str) -> str | None:
    """None if the VM runs here with its heartbeat rising and no verification error."""
    first = daemon.call("vm.show", name=name)
    if first["state"] != "running":
        return f"{name} is {first['state']} on {daemon.name}"
    try:
        wait_for(
            lambda: (
                daemon.call("vm.show", name=name)["guest"]["heartbeat_generation"]
                > first["guest"]["heartbeat_generation"] + 3
            ),
            timeout=30,
            what=f"{name}'s heartbeat on {daemon.name}",
        )
    except AssertionError as err:
        return str(err)
    shown = daemon.call("vm.show", name=name)
    if shown["guest"]["verification_errors"] or shown["error"] is not None:
        return f"{name}: {shown['guest']['verification_errors']} verification errors, error {shown['error']}"
    return None


def names_on(daemon: DaemonProcess) -> list[str]:
    return [v["name"] for v in daemon.call("vm.list") if v["state"] == "running"]


def migrate_until_done(
    source: DaemonProcess, target: DaemonProcess, name: str, failures: list[dict[str, Any]], attempts: int = 5
) -> dict[str, Any]:
    """Migrate; a failed attempt (the VM runs on at the source) is recorded and tried again."""
    for _ in range(attempts):
        source.call("migrate", name=name, to=target.address)
        stats: dict[str, Any] = wait_migration(source, name, timeout=300)
        if stats["state"] == "completed":
            return stats
        failures.append({"from": source.name, "state": stats["state"], "error": stats.get("error")})
    raise RuntimeError(f"{name} did not migrate {source.name}->{target.name} in {attempts} attempts: {failures[-1]}")


def ping_pong(a: DaemonProcess, b: DaemonProcess, migrations: int) -> dict[str, Any]:
    """`migrations` migrations of one VM after the warm-up, sampled after each."""
    a.call("vm.create", name="soak", **VM)
    source, target = a, b
    samples: list[dict[str, Any]] = []
    baselines: dict[int, dict[str, dict[str, int]]] = {}  # parity -> daemon -> counts
    drift: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for index in range(WARMUP_MIGRATIONS + migrations):
        stats = migrate_until_done(source, target, "soak", failures)
        source, target = target, source
        parity = index % 2
        expected = baselines.get(parity)
        sample: dict[str, Any] = {
            "migration": index - WARMUP_MIGRATIONS + 1,
            "downtime_ms": round(stats["downtime_ms"], 1),
            "total_ms": round(stats["total_ms"], 1),
        }
        for daemon in (a, b):
            sample[daemon.name] = settled(daemon, expected[daemon.name] if expected else None)
        if index >= WARMUP_MIGRATIONS - 2 and parity not in baselines:
            baselines[parity] = {d.name: sample[d.name] for d in (a, b)}
        if index >= WARMUP_MIGRATIONS:
            samples.append(sample)
            for daemon in (a, b):
                base = baselines[parity][daemon.name]
                if any(sample[daemon.name][k] != base[k] for k in ("fds", "threads")):
                    drift.append({"migration": sample["migration"], "daemon": daemon.name, **sample[daemon.name]})
    problem = guest_ok(source, "soak")
    source.call("vm.stop", name="soak")
    # After an odd migration (1, 3, ...) b hosts the VM, after an even one a does: RSS is flat
    # when each daemon's hosting and empty samples are flat on their own.
    rss: dict[str, dict[str, Any]] = {}
    for daemon in ("a", "b"):
        for hosting in (True, False):
            values = [
                s[daemon]["rss_kib"] / 1024
                for s in samples
                if ((s["migration"] % 2 == 1) == (daemon == "b")) == hosting
            ]
            if values:
                rss[f"{daemon}_{'hosting' if hosting else 'empty'}"] = {
                    "first": round(values[0], 1),
                    "last": round(values[-1], 1),
                    "min": round(min(values), 1),
                    "max": round(max(values), 1),
                }
    return {
        "migrations": migrations,
        "baselines": {str(p): v for p, v in baselines.items()},
        "drift": drift,
        "failed_attempts": failures,
        "guest_problem": problem,
        "rss_mib": rss,
        "samples": samples,
    }


def four_at_once(a: DaemonProcess, b: DaemonProcess) -> dict[str, Any]:
    """Two VMs A->B and two B->A, started together; each must end on exactly one side, sound."""
    moves = [("q1", a, b), ("q2", a, b), ("q3", b, a), ("q4", b, a)]
    for name, source, _ in moves:
        source.call("vm.create", name=name, **SMALL_VM)
    for name, source, target in moves:
        source.call("migrate", name=name, to=target.address)
    results = {}
    for name, source, target in moves:
        stats = wait_migration(source, name, timeout=300)
        on_a, on_b = name in names_on(a), name in names_on(b)
        home = target if stats["state"] == "completed" else source
        results[name] = {
            "from": source.name,
            "to": target.name,
            "state": stats["state"],
            "error": stats.get("error"),
            "running_on": [d for d, here in (("a", on_a), ("b", on_b)) if here],
            "guest_problem": guest_ok(home, name),
        }
    for name, _, _ in moves:
        for daemon in (a, b):
            if name in names_on(daemon):
                daemon.call("vm.stop", name=name)
    return results


# A soak counts resources, not convergence: on a busy host a migration that would not converge
# is cut over anyway, so that every one of them completes and the VM really goes back and forth.
CONFIG = '[migration]\non_no_convergence = "force-downtime"\ndowntime_guard_ms = 5000\n'


def start_pair(work: Path) -> tuple[DaemonProcess, DaemonProcess]:
    key = work / "peer.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    config = work / "soak.toml"
    config.write_text(CONFIG)
    extra = ("--config", str(config))
    return DaemonProcess("a", work, key, extra_args=extra).start(), DaemonProcess(
        "b", work, key, extra_args=extra
    ).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=100)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="migrated-soak-") as work:
        a, b = start_pair(Path(work))
        try:
            started = time.monotonic()
            pong = ping_pong(a, b, args.migrations)
            both_ways = four_at_once(a, b)
            after = {d.name: settled(d, None) for d in (a, b)}
            seconds = time.monotonic() - started
        finally:
            a.stop()
            b.stop()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"seconds": round(seconds, 1), "ping_pong": pong, "four_at_once": both_ways, "after_all": after}
    (args.out_dir / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    write_svg(args.out_dir / "soak.svg", pong["samples"])
    summary = {k: v for k, v in pong.items() if k != "samples"}
    print(json.dumps({"seconds": report["seconds"], "ping_pong": summary, "four_at_once": both_ways}, indent=2))
    print(f"plot: {args.out_dir / 'soak.svg'}")
    bad = (
        pong["drift"]
        or pong["guest_problem"]
        or any(len(r["running_on"]) != 1 or r["guest_problem"] for r in both_ways.values())
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
