"""The downtime's fine marks from daemon logs, both sides on one axis: per mark the median (min,
max) in ms since the source's pause began, and per gap between consecutive marks.

Reads the `downtime_timeline` (source) and `cutover_timeline` (target) events of every completed
migration in the given logs (e.g. a `bench/fixed_cost.py --workdir DIR` run: `DIR/*.log`). The
marks are CLOCK_MONOTONIC, shared by all processes of a host, so the target's marks are placed on
the source's axis by the difference of the two origins (daemons on one machine only).

    python bench/timeline.py DIR/*.log [--group l300off]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def events(paths: list[Path], group: str | None) -> dict[str, dict[str, dict[str, Any]]]:
    """migration_id -> {"source": event, "target": event}."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for path in paths:
        if group is not None and not path.name.startswith(group):
            continue
        for text in path.read_text(errors="replace").splitlines():
            if "_timeline" not in text:
                continue
            try:
                event = json.loads(text)
            except ValueError:
                continue
            kind = {"downtime_timeline": "source", "cutover_timeline": "target"}.get(event.get("event"))
            if kind is None or "migration_id" not in event:
                continue
            found.setdefault(str(event["migration_id"]), {})[kind] = event
    return found


def merged(pair: dict[str, dict[str, Any]]) -> list[tuple[str, float]]:
    source = pair["source"]
    marks = [(f"src.{name}", ms) for name, ms in source["marks_ms"].items()]
    target = pair.get("target")
    if target is not None:
        shift = (target["origin"] - source["origin"]) * 1e3
        if "done_received" not in target["marks_ms"]:
            marks.append(("tgt.done_received", shift))  # an older target's origin was Done
        marks += [(f"tgt.{name}", shift + ms) for name, ms in target["marks_ms"].items()]
    return sorted(marks, key=lambda m: m[1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--group", help="only logs whose name starts with this (fixed_cost's line label, e.g. l300off)")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    args = parser.parse_args()
    pairs = [p for p in events(args.logs, args.group).values() if "source" in p]
    if not pairs:
        print("no downtime_timeline events in these logs", file=sys.stderr)
        return 1
    at: dict[str, list[float]] = {}
    gap: dict[str, list[float]] = {}
    order: list[str] = []
    for pair in pairs:
        previous = ("pause_began", 0.0)
        for name, ms in merged(pair):
            if name not in order:
                order.append(name)
            at.setdefault(name, []).append(ms)
            gap.setdefault(name, []).append(ms - previous[1])
            previous = (name, ms)
    order.sort(key=lambda n: statistics.median(at[n]))
    if args.json:
        out = {
            "migrations": len(pairs),
            "marks": {n: {"at_ms": statistics.median(at[n]), "gap_ms": statistics.median(gap[n])} for n in order},
        }
        print(json.dumps(out, indent=1))
        return 0
    print(f"{len(pairs)} migrations; ms since the pause began: median (min-max); gap since the previous mark")
    for name in order:
        print(f"{name:32s} at {spread(at[name])}   gap {spread(gap[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
