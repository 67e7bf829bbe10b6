"""Dependency direction is the architecture (STYLE.md): checked on the import statements.

- `transport/` knows neither trio nor sockets nor the daemon.
- `ringreader/` knows neither trio nor the protocol nor the daemon.
- `migrated/kvm/` (the VM layer) knows nothing of migration, trio or the protocol.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

RULES = {
    "transport": {"trio", "socket", "ssl", "migrated", "ringreader", "selectors", "asyncio"},
    "ringreader": {"trio", "migrated", "transport", "socket"},
    "migrated/kvm": {"trio", "transport", "migrated.migration", "migrated.daemon", "socket"},
}


def _imported_modules(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_only_downward(package: str) -> None:
    forbidden = RULES[package]
    sources = sorted((REPO / package).rglob("*.py"))
    assert sources, f"{package} has no Python sources"
    offenders = []
    for source in sources:
        for module in _imported_modules(source):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                offenders.append(f"{source.relative_to(REPO)} imports {module}")
    assert not offenders, "\n".join(offenders)
