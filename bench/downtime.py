"""Predicted against measured downtime over ping-pong migrations, on a quiet host and beside a CPU
hog, in one run; JSON out.

A workload VM (default 512 MiB, 2 vCPUs, dirtying 128 MiB/s over 256 MiB) migrates A -> B -> A ...
`--migrations` times at a `--limit-ms` downtime limit, first with the host as it is, then with one
busy-looping process per core beside it (`--hog`, default on). Each migration reports its predicted
and measured downtime, the prediction term by term, the measured breakdown, whether it was over the
limit and whether it was an outlier; the summary counts converged migrations within the limit.

    python bench/downtime.py [--migrations 10] [--limit-ms 100] [--memory-mib 512] [--no-hog]
                             [--verify full|off] [--realtime on|off] [--only-hog]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "migration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.py

from daemons import DaemonProcess, wait_for, wait_migration  # noqa: E402


def ping_pong(args: argparse.Namespace, work: Path, label: str) -> dict[str, Any]:
    key = work / f"{label}.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    config = work / f"{label}.toml"
    config.write_text(
        f'[migration]\ndowntime_limit_ms = {args.limit_ms}\nverify = "{args.verify}"\n'
        f"downtime_realtime = {'true' if args.realtime == 'on' else 'false'}\n"
    )
    a = DaemonProcess(f"{label}-a", work, key, extra_args=("--config", str(config))).start()
    b = DaemonProcess(f"{label}-b", work, key, extra_args=("--config", str(config))).start()
    runs = []
    try:
        a.call(
            "vm.create",
            name="vm1",
            memory_mib=args.memory_mib,
            vcpus=args.vcpus,
            dirty_rate_mib_s=args.dirty_rate,
            working_set_mib=args.working_set_mib,
        )
        wait_for(lambda: a.call("vm.show", name="vm1")["guest"]["heartbeat_generation"] > 0, what="the guest")
        source, target = a, b
        for _ in range(args.migrations):
            source.call("migrate", name="vm1", to=target.address)
            stats = wait_migration(source, "vm1", timeout=300)
            runs.append(
                {
                    "from": source.name,
                    "state": stats["state"],
                    "error": stats.get("error"),
                    "rounds": stats["rounds"],
                    "final_pages": stats.get("final_pages"),
                    "bandwidth_mib_s": _round(stats.get("bandwidth_mib_s")),
                    "dirty_rate_mib_s": _round(stats.get("dirty_rate_mib_s")),
                    "predicted_ms": _round(stats.get("predicted_downtime_ms")),
                    "measured_ms": _round(stats.get("downtime_ms")),
                    "over_limit": stats.get("downtime_limit_exceeded"),
                    "outlier": stats.get("downtime_outlier"),
                    "gc_ms": stats.get("downtime_gc_ms"),
                    "send_ms_per_gib": stats.get("send_ms_per_gib"),
                    "realtime_threads": stats.get("downtime_realtime_threads"),
                    "predicted_terms_ms": stats.get("predicted_downtime_terms_ms"),
                    "measured_breakdown_ms": stats.get("downtime_breakdown_ms"),
                }
            )
            if stats["state"] == "completed":
                source, target = target, source
            # Otherwise the VM runs on the source still (the policy gave up): try again from there.
    finally:
        a.stop()
        b.stop()
    completed = [r for r in runs if r["state"] == "completed"]
    return {
        "label": label,
        "migrations": runs,
        "completed": len(completed),
        "not_converged": sum(1 for r in runs if r["state"] == "failed" and "did not converge" in (r["error"] or "")),
        "within_limit": sum(1 for r in completed if not r["over_limit"]),
        "over_limit": sum(1 for r in completed if r["over_limit"]),
        "measured_ms": sorted(r["measured_ms"] for r in completed),
        "predicted_ms": sorted(r["predicted_ms"] for r in completed),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=10)
    parser.add_argument("--limit-ms", type=int, default=100)
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--dirty-rate", type=float, default=128.0)
    parser.add_argument("--working-set-mib", type=int, default=256)
    parser.add_argument("--verify", choices=["full", "off"], default="full")
    parser.add_argument("--realtime", choices=["on", "off"], default="on", help="migration.downtime_realtime")
    parser.add_argument("--no-hog", dest="hog", action="store_false", help="skip the run beside a CPU hog")
    parser.add_argument("--only-hog", action="store_true", help="skip the run on the quiet host")
    args = parser.parse_args()
    results = {"limit_ms": args.limit_ms, "verify": args.verify, "realtime": args.realtime, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-downtime-") as tmp:
        work = Path(tmp)
        if not args.only_hog:
            results["runs"].append(ping_pong(args, work, "quiet"))
        if args.hog:
            hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(os.cpu_count() or 1)]
            try:
                results["runs"].append(ping_pong(args, work, "hog"))
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
