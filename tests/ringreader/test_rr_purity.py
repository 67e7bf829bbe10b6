"""ringreader's oracle stays pure Python and its ABI version agrees everywhere (the import direction
is checked by tests/test_layering.py)."""

from __future__ import annotations

import ast
import pathlib
import re

import ringreader
from ringreader._shim import lib

PACKAGE = pathlib.Path(ringreader.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_oracle_uses_neither_numpy_nor_c() -> None:
    for name in ("oracle.py", "_constants.py"):
        allowed = {"__future__", "collections.abc", "typing", "._constants"}
        assert _imports(PACKAGE / name) <= allowed, name


def test_abi_version_agrees_everywhere() -> None:
    header = (PACKAGE / "ringreader.h").read_text()
    match = re.search(r"#define RR_ABI_VERSION (\d+)", header)
    assert match is not None
    assert int(match.group(1)) == ringreader.ABI_VERSION == lib.rr_abi_version()
