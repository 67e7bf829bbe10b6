"""Every coverage-guided fuzzer under fuzz/ (fuzz_*.py, atheris) runs a bounded number of inputs
here, so CI runs them; `make fuzz` runs them to a million inputs each. A crash, an escaping
exception, a failed check or a run that stops short fails the test with libFuzzer's output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESSES = sorted((REPO / "fuzz").glob("fuzz_*.py"))
RUNS = 20_000


def test_the_harnesses_exist() -> None:
    assert HARNESSES, "no fuzz/fuzz_*.py found"


def _param(harness: Path) -> object:
    """A harness whose docstring says it needs /dev/kvm is a `kvm` test (conftest.py's rules)."""
    marks = [pytest.mark.kvm] if "Needs /dev/kvm" in harness.read_text() else []
    return pytest.param(harness, marks=marks, id=harness.name)


@pytest.mark.parametrize("harness", [_param(h) for h in HARNESSES])
def test_a_bounded_fuzzing_run_finds_nothing(harness: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(harness), f"-runs={RUNS}", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=500,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"Done {RUNS} runs" in output, output[-6000:]
    assert not list(tmp_path.iterdir()), "libFuzzer wrote crash artifacts"
