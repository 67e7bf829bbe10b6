"""The fixed cost of one migration: the boot-sector guest (150 MiB, 1 vCPU) ping-pong between
two real daemons, at each downtime limit and verify mode; JSON out with medians and ranges of the
total time, setup, downtime and every downtime step, and of every step outside the downtime on
each side (`source_phase_steps_ms`, `target_phase_steps_ms`: the stats' `phase_steps_ms`; a
checkout that has none leaves them empty). Steps named `overlapped.*` ran beside the others.

The guest dirties little between migrations, so what is measured is what every migration pays
whatever its size. To compare two versions in one run, give `--reference` a checkout of the
other (with this script copied into its bench/): its daemons run the same lines, interleaved
round by round with this checkout's.

    python bench/fixed_cost.py [--migrations 5] [--limits 300,30] [--verify off,full]
                               [--reference DIR --rounds 3] [--daemon-config K=V ...]
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

from daemonconfig import write_daemon_config  # noqa: E402
from daemons import DaemonProcess, wait_for, wait_migration  # noqa: E402

from migrated.control import RequestError  # noqa: E402
from migrated.guests.x86_64.bootsector import BootSectorParams  # noqa: E402
from migrated.guests.x86_64.bootsector.build import build_boot_sector, write_image  # noqa: E402

MIB = 1 << 20
VM = "boot"


def spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}


def line(args: argparse.Namespace, work: Path, image: Path, limit_ms: int, verify: str) -> list[dict[str, Any]]:
    label = f"l{limit_ms}{verify}"
    key = work / f"{label}.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    config = write_daemon_config(
        work / f"{label}.toml",
        [f"migration.downtime_limit_ms={limit_ms}", f"migration.verify={verify}", *args.daemon_config],
    )
    extra = ("--config", str(config))
    a = DaemonProcess(f"{label}-a", work, key, extra_args=extra).start()
    b = DaemonProcess(f"{label}-b", work, key, extra_args=extra).start()
    runs: list[dict[str, Any]] = []
    try:
        a.call(
            "vm.create",
            name=VM,
            memory_mib=args.memory_mib,
            vcpus=1,
            guest="raw",
            image=str(image),
            load_addr=0x7C00,
            entry="real",
        )
        wait_for(lambda: "protected mode" in a.call("vm.console", name=VM)["output"], timeout=60, what="the guest")
        source, target = a, b
        for _ in range(args.migrations):
            time.sleep(args.settle_s)  # the guest runs at its own pace before each migration
            try:
                source.call("migrate", name=VM, to=target.address, downtime_limit_ms=limit_ms, verify=verify)
            except RequestError as err:  # the guest itself failed (its error says why): the line ends
                shown = source.call("vm.show", name=VM)
                runs.append({"state": "not-started", "error": f"{err}: {shown.get('error')}", "breakdown_ms": {}})
                break
            stats = wait_migration(source, VM, timeout=300)
            incoming = _incoming_stats(target, stats.get("migration_id"))
            runs.append(
                {
                    "state": stats["state"],
                    "error": stats.get("error"),
                    "total_ms": stats.get("total_ms"),
                    "setup_ms": stats.get("setup_ms"),
                    "downtime_ms": stats.get("downtime_ms"),
                    "guest_downtime_ms": stats.get("guest_downtime_ms"),
                    "predicted_downtime_ms": stats.get("predicted_downtime_ms"),
                    "predicted_terms_ms": stats.get("predicted_downtime_terms_ms") or {},
                    "rounds": stats.get("rounds"),
                    "final_pages": stats.get("final_pages"),
                    "breakdown_ms": stats.get("downtime_breakdown_ms") or {},
                    "phase_steps_ms": _with_downtime(stats),
                    "target_phase_steps_ms": incoming.get("phase_steps_ms") or {},
                }
            )
            if stats["state"] == "completed":
                source, target = target, source
    finally:
        a.stop()
        b.stop()
    return runs


def _incoming_stats(target: DaemonProcess, migration_id: str | None) -> dict[str, Any]:
    """The target's own figures of this migration (its step times), once it recorded them."""
    try:
        stats = target.call("migration.status", name=VM) or {}
    except RequestError:
        return {}
    return stats if stats.get("migration_id") == migration_id else {}


def _with_downtime(stats: dict[str, Any]) -> dict[str, float]:
    """The source's steps, then its downtime, then what remains of total_ms (up to the pause,
    from RUNNING on): together they add up to total_ms."""
    steps = dict(stats.get("phase_steps_ms") or {})
    total, downtime = stats.get("total_ms"), stats.get("downtime_ms")
    if steps and total is not None and downtime is not None:
        consecutive = sum(ms for name, ms in steps.items() if not name.startswith("overlapped."))
        steps["downtime"] = downtime
        steps["around_downtime"] = total - consecutive - downtime
    return steps


def _steps(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Median and range of every step named in the runs' `key` dicts (a step missing from a
    run, such as a dirty round's when there was none, counts only where it ran)."""
    names = list(dict.fromkeys(s for r in runs for s in r.get(key, {})))
    return {s: spread([r[key][s] for r in runs if s in r.get(key, {})]) for s in names}


def summarize(limit_ms: int, verify: str, runs: list[dict[str, Any]], keep_runs: bool) -> dict[str, Any]:
    done = [r for r in runs if r["state"] == "completed"]
    steps = sorted({s for r in done for s in r["breakdown_ms"]})
    return {
        "limit_ms": limit_ms,
        "verify": verify,
        "completed": len(done),
        "migrations": len(runs),
        "errors": sorted({r["error"] for r in runs if r["error"]}),
        "total_ms": spread([r["total_ms"] for r in done]),
        "setup_ms": spread([r["setup_ms"] for r in done]),
        "downtime_ms": spread([r["downtime_ms"] for r in done]),
        "guest_downtime_ms": spread([r["guest_downtime_ms"] for r in done if r.get("guest_downtime_ms") is not None]),
        "predicted_downtime_ms": spread([r["predicted_downtime_ms"] for r in done if r["predicted_downtime_ms"]]),
        "rounds": spread([r["rounds"] for r in done]),
        "steps_ms": {s: spread([r["breakdown_ms"][s] for r in done if s in r["breakdown_ms"]]) for s in steps},
        "source_phase_steps_ms": _steps(done, "phase_steps_ms"),
        "target_phase_steps_ms": _steps(done, "target_phase_steps_ms"),
        "runs": runs if keep_runs else None,
    }


def measure(args: argparse.Namespace) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """Every line of this checkout once: (limit, verify) -> its migrations."""
    params = BootSectorParams(bytes=args.region_mib * MIB, print_every=1)
    params.check_fits(args.memory_mib * MIB)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fixed-cost-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        image = work / "boot.bin"
        write_image(image, build_boot_sector(params))
        for limit in [int(x) for x in args.limits.split(",")]:
            for verify in args.verify.split(","):
                runs[(limit, verify)] = line(args, work, image, limit, verify)
    return runs


def measure_reference(args: argparse.Namespace) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """The same lines with the daemons of the reference checkout: its own copy of this script
    runs them (the daemons run from the checkout the script is in)."""
    script = args.reference / "bench" / "fixed_cost.py"
    if not script.is_file():
        raise SystemExit(f"--reference {args.reference}: no {script}; copy bench/fixed_cost.py there first")
    command = [sys.executable, str(script), "--runs", "--rounds", "1"]
    for name in ("migrations", "limits", "verify", "memory_mib", "region_mib", "settle_s"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for setting in args.daemon_config:
        command += ["--daemon-config", setting]
    if args.workdir is not None:
        # The reference's daemon logs too (bench/timeline.py DIR/reference/*.log).
        command += ["--workdir", str(args.workdir / "reference")]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)["this"]
    return {(entry["limit_ms"], entry["verify"]): entry["runs"] for entry in result["lines"]}


def _commit(repo: Path) -> str:
    answer = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return answer.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--migrations", type=int, default=5, help="ping-pong migrations per line")
    parser.add_argument("--limits", default="300,30", help="downtime limits (ms), comma-separated")
    parser.add_argument("--verify", default="off,full", help="verify modes, comma-separated")
    parser.add_argument("--memory-mib", type=int, default=150, help="guest RAM")
    parser.add_argument("--region-mib", type=int, default=100, help="RAM the boot sector rewrites")
    parser.add_argument("--settle-s", type=float, default=0.5, help="guest run time before each migration")
    parser.add_argument("--runs", action="store_true", help="every migration's figures, not only the summary")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the daemons' logs and state here, the reference's in its reference/ (default: a temporary dir)",
    )
    parser.add_argument(
        "--reference", type=Path, help="a checkout to compare with: its daemons run the same lines, interleaved"
    )
    parser.add_argument(
        "--daemon-config",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a daemon setting for both daemons of every line (and the reference's), repeatable",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds (this checkout, then the reference, each round)")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    sides: dict[str, dict[tuple[int, str], list[dict[str, Any]]]] = {"this": {}}
    if args.reference is not None:
        sides["reference"] = {}
    for _ in range(args.rounds):
        for side, collected in sides.items():
            measured = measure(args) if side == "this" else measure_reference(args)
            for key, runs in measured.items():
                collected.setdefault(key, []).extend(runs)
    report: dict[str, Any] = {"load": os.getloadavg()}
    for side, collected in sides.items():
        report[side] = {
            "commit": _commit(repo if side == "this" else args.reference),
            "lines": [summarize(limit, verify, runs, args.runs) for (limit, verify), runs in collected.items()],
        }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
