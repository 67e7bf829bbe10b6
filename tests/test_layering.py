"""Dependency direction is the architecture (STYLE.md): the one layering test.

The rules and the checker are in tests/layering.py; here they run on this repository, on
temporary trees with a planted violation (so the checker is shown to catch what it claims), and
at run time on what importing a leaf package really pulls in.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
from layering import check, module_names

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_repository_keeps_the_rules() -> None:
    names = module_names(REPO)
    assert {"migrated.daemon", "migrated.kvm.vm", "transport.connection", "ringreader._shim"} <= names.keys()
    problems = check(REPO)
    assert not problems, "\n".join(problems)


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the three packages' Python sources, to plant violations in."""
    for package in ("migrated", "transport", "ringreader"):
        for source in (REPO / package).rglob("*.py"):
            copy = tmp_path / source.relative_to(REPO)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
    assert not check(tmp_path), "the copied tree must start clean"
    return tmp_path


def _plant(tree: pathlib.Path, relative: str, code: str) -> None:
    path = tree / relative
    path.write_text(path.read_text() + "\n\n" + code + "\n")


PLANTED = [
    # (file, code appended, a finding that must name it)
    (
        "migrated/kvm/memory.py",
        "def _lazy() -> None:\n    from ..migration import source  # noqa",
        "migrated/kvm/memory.py:",
    ),
    ("migrated/kvm/vcpu.py", "from .. import daemon", "a layer above it"),
    ("migrated/kvm/dirty.py", "import trio", "migrated.kvm imports trio"),
    ("transport/framing.py", "from migrated import config", "transport imports migrated.config"),
    ("transport/events.py", "import socket", "transport imports socket"),
    ("ringreader/oracle.py", "import trio", "ringreader imports trio"),
    ("migrated/devices/legacy.py", "from migrated.kvm._libc import ioctl", "migrated.kvm._libc used outside"),
    ("migrated/guests/pages.py", "from fcntl import ioctl", "ioctl imported from fcntl"),
    ("migrated/migration/policy.py", "import fcntl\nfcntl.ioctl(0, 0)", "fcntl.ioctl outside"),
    ("migrated/kvm/memory.py", "from . import vm", "import cycle"),
    ("transport/limits.py", "def _lazy() -> None:\n    from .connection import Connection  # noqa", "import cycle"),
]


@pytest.mark.parametrize(("relative", "code", "finding"), PLANTED, ids=[p[0] + ":" + p[2] for p in PLANTED])
def test_checker_catches_a_planted_violation(tree: pathlib.Path, relative: str, code: str, finding: str) -> None:
    _plant(tree, relative, code)
    problems = check(tree)
    assert any(finding in problem for problem in problems), problems


def test_planted_relative_import_of_migration_in_kvm_is_named(tree: pathlib.Path) -> None:
    """The review's example: `from ..migration import source` in migrated/kvm, resolved."""
    _plant(tree, "migrated/kvm/vm.py", "from ..migration import source")
    problems = check(tree)
    assert any(
        p.startswith("migrated/kvm/vm.py:") and "imports migrated.migration.source, a layer above it" in p
        for p in problems
    ), problems


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("transport", ("trio", "socket", "ssl", "migrated", "ringreader", "asyncio", "selectors")),
        ("ringreader", ("trio", "migrated", "transport")),
        ("migrated.kvm.vm", ("trio", "transport", "migrated.migration", "migrated.daemon")),
    ],
)
def test_import_pulls_in_no_upper_layer(package: str, forbidden: tuple[str, ...]) -> None:
    """What `import X` really loads, in a fresh interpreter: the rules hold at run time too."""
    code = (
        f"import sys, {package}\n"
        f"print(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {forbidden!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
