"""The fault matrix (`make faults`): faults at random points of every migration phase between two
daemons in their own network namespaces; every outcome classified; JSON out, totals printed last.

    python bench/faults.py [--seed 11] [--faults 140] [--out bench/out/faults.json]

The default run is the whole matrix: each fault kind (bench/faultmatrix/plan.py) at each phase
once, in an order the seed shuffles, each at a seeded random point of its phase. Exit status 1 if
any split brain, unreported loss, guest check failure, unsettled outcome or daemon crash.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultmatrix.matrix import run_matrix  # noqa: E402
from faultmatrix.plan import KINDS, PHASES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--faults", type=int, default=len(KINDS) * len(PHASES))
    parser.add_argument("--keep", type=Path, help="run in this directory and keep the daemons' logs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "faults.json")
    args = parser.parse_args()

    def progress(record: dict[str, Any]) -> None:
        print(
            f"{record['index']:3d} {record['phase']:>9} {record['kind']:<24} -> {record['class']}"
            f" (at {record['observed']}, {record['seconds']} s)",
            file=sys.stderr,
            flush=True,
        )

    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = run_matrix(args.keep, args.seed, args.faults, progress)
    else:
        with tempfile.TemporaryDirectory(prefix="migrated-faults-") as work:
            report = run_matrix(Path(work), args.seed, args.faults, progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["totals"], indent=2))
    totals = report["totals"]
    bad = totals["split_brains"] + totals["unreported_losses"] + totals["guest_check_failures"] + totals["unsettled"]
    return 1 if bad or totals["daemon_crashes"] or totals["daemon_crash_outcomes"] else 0


if __name__ == "__main__":
    sys.exit(main())
