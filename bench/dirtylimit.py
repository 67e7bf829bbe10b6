"""Whole-VM throttle against the per-vCPU dirty limit on a guest that writes faster than the link,
in one run, interleaved; JSON out.

A 2-vCPU workload VM whose vCPU 0 rewrites its half of the working set as fast as it can and whose
vCPU 1 dirties `--slow-mib-s` migrates A -> B -> A ... over a link capped at `--cap-mib-s`, with
`on_no_convergence` alternating between "throttle" and "dirty-limit" migration by migration (so a
host that gets busier mid-run weighs on both alike). Each migration reports its total time, its
downtime, its rounds, the limits the dirty limit set, and each vCPU's progress while it ran
(pages written and heartbeats per second, from the guest's own counters, which travel with its
RAM): the point of the dirty limit is that the slow vCPU keeps its pace while the fast one is held.
The summary gives medians and ranges per policy, and the slow vCPU's pace as a share of its rate.

    python bench/dirtylimit.py [--migrations 6] [--cap-mib-s 32] [--slow-mib-s 2] [--limit-ms 400]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "migration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.py

from daemons import DaemonProcess, wait_for, wait_migration  # noqa: E402

MIB = 1 << 20
POLICIES = ("throttle", "dirty-limit")
Counters = tuple[float, list[int], list[int]]  # time, pages written and heartbeats by vCPU


def guest_counters(daemon: DaemonProcess) -> Counters:
    guest = daemon.call("vm.show", name="vm1")["guest"]
    return time.monotonic(), list(guest["pages_written_per_vcpu"]), list(guest["heartbeat"])


def pace(before: Counters, after: Counters) -> dict[str, Any]:
    seconds = after[0] - before[0]
    return {
        "mib_s": [round((b - a) * 4096 / MIB / seconds, 2) for a, b in zip(before[1], after[1], strict=True)],
        "heartbeats_per_s": [round((b - a) / seconds, 1) for a, b in zip(before[2], after[2], strict=True)],
    }


def watch_rounds(source: DaemonProcess, max_rounds: int) -> tuple[Counters | None, Counters | None]:
    """The guest's counters once the policy acts (the round after max_rounds) and once the VM
    paused for the downtime (taken at the last poll that still saw the rounds: the guest's
    counters stand still from the pause on). None where the migration passed that point before
    a poll saw it."""
    engaged: Counters | None = None
    last: Counters | None = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        stats = source.call("migration.status", name="vm1")
        if stats["state"] not in ("setup", "bulk", "rounds"):
            if engaged is None or last is None:
                return engaged, None
            try:
                frozen = guest_counters(source)
            except Exception:  # released already: the VM is the target's
                return engaged, None
            # The counters of the pause, at the time of the last poll that saw the VM running.
            return engaged, (last[0], frozen[1], frozen[2])
        if stats["round"] > max_rounds:
            last = guest_counters(source)
            if engaged is None:
                engaged = last
        time.sleep(0.01)  # polling a condition; the wait ends on it
    raise AssertionError("the migration did not reach its downtime within 300 s")


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    key = work / "peer.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    config = work / "bench.toml"
    config.write_text(f'[migration]\nverify = "{args.verify}"\ndowntime_guard_ms = 60000\n')
    a = DaemonProcess("a", work, key, extra_args=("--config", str(config))).start()
    b = DaemonProcess("b", work, key, extra_args=("--config", str(config))).start()
    runs: list[dict[str, Any]] = []
    try:
        a.call(
            "vm.create",
            name="vm1",
            memory_mib=args.memory_mib,
            vcpus=2,
            dirty_rate_mib_s="max",
            working_set_mib=args.working_set_mib,
        )
        wait_for(lambda: a.call("vm.show", name="vm1")["guest"]["heartbeat_generation"] > 0, what="the guest")
        a.call("vm.set", name="vm1", dirty_rate_mib_s=args.slow_mib_s, vcpu=1)
        source, target = a, b
        for index in range(args.migrations):
            policy = POLICIES[index % 2]
            # The guest's pace just before, as the reference each migration is compared with.
            first = guest_counters(source)
            time.sleep(args.reference_s)  # a measuring window, not a wait for an event
            before = guest_counters(source)
            source.call(
                "migrate",
                name="vm1",
                to=target.address,
                on_no_convergence=policy,
                max_rounds=args.max_rounds,
                downtime_limit_ms=args.limit_ms,
                max_bandwidth_mib_s=args.cap_mib_s,
            )
            engaged, paused = watch_rounds(source, args.max_rounds)
            stats = wait_migration(source, "vm1", timeout=300)
            moved = stats["state"] == "completed"
            after = guest_counters(target if moved else source)
            runs.append(
                {
                    "policy": policy,
                    "from": source.name,
                    "state": stats["state"],
                    "error": stats.get("error"),
                    "total_ms": round(stats["total_ms"], 1),
                    "downtime_ms": None if stats.get("downtime_ms") is None else round(stats["downtime_ms"], 1),
                    "rounds": stats["rounds"],
                    "throttle_percent": stats.get("throttle_percent"),
                    "dirty_limits": stats.get("dirty_limits"),
                    "dirty_limited_vcpus": stats.get("dirty_limited_vcpus"),
                    "before": pace(first, before),
                    "during": pace(before, after),
                    # From the first round the policy acted in to the pause.
                    "while_policy_acts": None if engaged is None or paused is None else pace(engaged, paused),
                }
            )
            if moved:
                source, target = target, source
    finally:
        a.stop()
        b.stop()
    return runs


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}


def summary(runs: list[dict[str, Any]], slow_mib_s: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for policy in POLICIES:
        done = [r for r in runs if r["policy"] == policy and r["state"] == "completed"]
        result[policy] = {
            "completed": len(done),
            "of": sum(1 for r in runs if r["policy"] == policy),
            "total_ms": _spread([r["total_ms"] for r in done]),
            "downtime_ms": _spread([r["downtime_ms"] for r in done]),
            "slow_vcpu_mib_s_during": _spread([r["during"]["mib_s"][1] for r in done]),
            "slow_vcpu_share_of_its_rate": _spread([round(r["during"]["mib_s"][1] / slow_mib_s, 3) for r in done]),
            "slow_vcpu_heartbeats_per_s_during": _spread([r["during"]["heartbeats_per_s"][1] for r in done]),
            "fast_vcpu_mib_s_during": _spread([r["during"]["mib_s"][0] for r in done]),
            "slow_vcpu_heartbeats_per_s_before": _spread([r["before"]["heartbeats_per_s"][1] for r in done]),
            "slow_vcpu_heartbeats_per_s_while_policy_acts": _spread(
                [r["while_policy_acts"]["heartbeats_per_s"][1] for r in done if r["while_policy_acts"]]
            ),
            "slow_vcpu_mib_s_while_policy_acts": _spread(
                [r["while_policy_acts"]["mib_s"][1] for r in done if r["while_policy_acts"]]
            ),
            "fast_vcpu_heartbeats_per_s_while_policy_acts": _spread(
                [r["while_policy_acts"]["heartbeats_per_s"][0] for r in done if r["while_policy_acts"]]
            ),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=6, help="in all, alternating the policy (default 6)")
    parser.add_argument("--cap-mib-s", type=float, default=32.0, help="max_bandwidth_mib_s (default 32)")
    parser.add_argument("--slow-mib-s", type=float, default=2.0, help="vCPU 1's dirty rate (default 2)")
    parser.add_argument("--limit-ms", type=int, default=400, help="downtime limit (default 400)")
    parser.add_argument("--max-rounds", type=int, default=3, help="rounds before the policy acts (default 3)")
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--working-set-mib", type=int, default=64, help="half per vCPU (default 64)")
    parser.add_argument("--verify", choices=["full", "off"], default="full")
    parser.add_argument("--reference-s", type=float, default=1.0, help="window for the pace before (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dirtylimit-") as tmp:
        runs = run(args, Path(tmp))
    print(
        json.dumps(
            {
                "cap_mib_s": args.cap_mib_s,
                "slow_vcpu_mib_s": args.slow_mib_s,
                "limit_ms": args.limit_ms,
                "summary": summary(runs, args.slow_mib_s),
                "migrations": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
