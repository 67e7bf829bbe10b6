"""ringreader stays a leaf: no trio, no daemon, no protocol; its oracle stays pure Python."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import ringreader
from ringreader._shim import lib

PACKAGE = pathlib.Path(ringreader.__file__).parent
REPO = PACKAGE.parent
FORBIDDEN = {"trio", "migrated", "transport"}


def test_import_pulls_in_no_upper_layer() -> None:
    code = (
        "import sys, ringreader, ringreader.oracle\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_no_module_names_an_upper_layer() -> None:
    for path in PACKAGE.glob("*.py"):
        tops = {name.lstrip(".").split(".")[0] for name in _imports(path) if not name.startswith(".")}
        assert not tops & FORBIDDEN, path


def test_oracle_uses_neither_numpy_nor_c() -> None:
    for name in ("oracle.py", "_constants.py"):
        allowed = {"__future__", "collections.abc", "typing", "._constants"}
        assert _imports(PACKAGE / name) <= allowed, name


def test_abi_version_agrees_everywhere() -> None:
    header = (PACKAGE / "ringreader.h").read_text()
    match = re.search(r"#define RR_ABI_VERSION (\d+)", header)
    assert match is not None
    assert int(match.group(1)) == ringreader.ABI_VERSION == lib.rr_abi_version()
