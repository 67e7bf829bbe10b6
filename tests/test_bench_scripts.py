"""Every benchmark script starts: its imports resolve and its command line parses (`--help`).

The benchmarks borrow the tests' daemon helpers; a move of those helpers once broke every
benchmark silently, because nothing ran them. Running them in full is `make bench` and friends
(minutes each); this only proves they would start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The scripts, not the modules they share (a script parses its command line with argparse).
SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if "argparse" in p.read_text())


def test_there_are_benchmarks() -> None:
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_starts(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, f"{script.name} --help exited {done.returncode}:\n{done.stderr[-2000:]}"
    assert "usage" in done.stdout.lower(), done.stdout
