"""transport stays sans-IO: no trio, no sockets, no TLS, nothing from the daemon."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import transport

PACKAGE = pathlib.Path(transport.__file__).parent
REPO = PACKAGE.parent
FORBIDDEN = {"trio", "socket", "ssl", "migrated", "ringreader", "asyncio", "selectors"}


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_module_names_io_or_an_upper_layer() -> None:
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 7
    for path in modules:
        tops = {name.split(".")[0] for name in _imports(path)}
        assert not tops & FORBIDDEN, (path.name, tops & FORBIDDEN)


def test_import_pulls_in_no_io() -> None:
    code = f"import sys, transport\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_module_owns_the_state() -> None:
    """Only states.py names the transition table; only connection.py assigns `state`."""
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        if path.name != "states.py":
            assert "TRANSITIONS: " not in text, path.name
        if path.name != "connection.py":
            assert "self.state =" not in text, path.name
