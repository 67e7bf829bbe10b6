"""The fault matrix, reduced (issue 11 item 5): a seeded run of bench/faults.py's matrix, so CI
sees any split brain, unreported loss, guest check failure, hang or daemon crash it finds.

Real namespaces, a real veth link, real signals, a real tmpfs filled to ENOSPC; the only test aid
is the daemons' cutover-holds fault (migrated/faults.py), which makes each cutover point a window
the harness can see and strike in. `make faults` runs the whole matrix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from faultmatrix.matrix import run_matrix  # noqa: E402
from faultmatrix.plan import KINDS, PHASES, make_plan  # noqa: E402

pytestmark = pytest.mark.kvm

SEED = 20261204
COUNT = 12


def test_the_plan_is_the_seeds_and_covers_the_matrix() -> None:
    assert make_plan(SEED, COUNT) == make_plan(SEED, COUNT)
    assert make_plan(SEED, COUNT) != make_plan(SEED + 1, COUNT)
    full = make_plan(1, len(PHASES) * len(KINDS))
    assert {(f.phase, f.kind) for f in full} == {(p, k) for p in PHASES for k in KINDS}


def test_a_reduced_fault_matrix_loses_no_vm_and_runs_none_twice(tmp_path: Path) -> None:
    report = run_matrix(tmp_path, SEED, COUNT)
    totals = report["totals"]
    print(json.dumps(totals, indent=2))
    assert totals["planned"] == COUNT
    assert totals["faults"] >= COUNT - 1, totals  # each phase is watched for, not slept into
    assert totals["split_brains"] == 0, totals["defects"]
    assert totals["unreported_losses"] == 0, totals["defects"]
    assert totals["guest_check_failures"] == 0, totals["defects"]
    assert totals["unsettled"] == 0, totals["defects"]
    assert totals["daemon_crashes"] == 0 and totals["daemon_crash_outcomes"] == 0, totals["defects"]
