"""The import-direction checker behind tests/test_layering.py, callable on any source tree.

Dependency direction is the architecture (STYLE.md). The checker reads every import statement of
the three import packages, wherever it sits: at module level, inside a function (a lazy import),
or under `if TYPE_CHECKING:` (a cycle hidden there still ties the two modules together). Relative
imports are resolved against the importing module's package, and `from .pkg import name` counts
as an import of `pkg.name` where that is a module.

Rules (each finding names the file, the line and the rule):
- no cycle between modules of the same tree;
- `transport/` imports neither I/O (trio, sockets, TLS, event loops) nor the other packages;
- `ringreader/` imports neither trio nor sockets nor the other packages;
- `migrated/kvm/` imports nothing from `migrated` above it, nor trio, sockets or the protocol;
- `ioctl` (the project's `_libc` or `fcntl.ioctl`) and `migrated.kvm._libc` only inside `migrated/kvm/`.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

PACKAGES = ("migrated", "transport", "ringreader")
IO_MODULES = ("trio", "socket", "ssl", "selectors", "asyncio")

# importer prefix -> imported prefixes it may not name
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "transport": (*IO_MODULES, "migrated", "ringreader"),
    "ringreader": ("trio", "socket", "migrated", "transport"),
    "migrated.kvm": ("trio", "socket", "transport"),
}
KVM_LAYER = "migrated.kvm"


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name, resolved
    names: tuple[str, ...]  # the names a `from` import takes (empty for `import x`)
    path: pathlib.Path
    line: int


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_names(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for the three packages under `root`."""
    modules: dict[str, pathlib.Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()  # a module's relative imports start at its package
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(root: pathlib.Path, modules: dict[str, pathlib.Path]) -> Iterator[Import]:
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(name, alias.name, (), path, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_package, node.level, node.module)
                names = tuple(alias.name for alias in node.names)
                submodules = [taken for taken in names if f"{target}.{taken}" in modules]
                # `from . import vmstate` imports the module vmstate, not what the package's
                # __init__ defines (a parent package runs first anyway, like for every import).
                if len(submodules) < len(names):
                    yield Import(name, target, names, path, node.lineno)
                for taken in submodules:
                    yield Import(name, f"{target}.{taken}", (taken,), path, node.lineno)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def check(root: pathlib.Path) -> list[str]:
    """Every violation of the rules above in the tree at `root`, as readable lines."""
    modules = module_names(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in imports_of(root, modules):
        where = f"{imp.path.relative_to(root)}:{imp.line}"
        if imp.imported in modules and imp.imported != imp.importer:
            graph[imp.importer].add(imp.imported)
        for importer_prefix, forbidden in FORBIDDEN.items():
            if _under(imp.importer, importer_prefix):
                for prefix in forbidden:
                    if _under(imp.imported, prefix):
                        problems.append(f"{where}: {importer_prefix} imports {imp.imported}")
        if _under(imp.importer, KVM_LAYER) and _under(imp.imported, "migrated") and not _under(imp.imported, KVM_LAYER):
            problems.append(f"{where}: {KVM_LAYER} imports {imp.imported}, a layer above it")
        if not _under(imp.importer, KVM_LAYER):
            libc = f"{KVM_LAYER}._libc"
            if _under(imp.imported, libc) or (imp.imported == KVM_LAYER and "_libc" in imp.names):
                problems.append(f"{where}: {libc} used outside {KVM_LAYER}")
            if "ioctl" in imp.names:
                problems.append(f"{where}: ioctl imported from {imp.imported} outside {KVM_LAYER}")
    for name, path in modules.items():
        if _under(name, KVM_LAYER):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "ioctl"
                and isinstance(node.value, ast.Name)
                and node.value.id in ("fcntl", "_libc")
            ):
                problems.append(f"{path.relative_to(root)}:{node.lineno}: {node.value.id}.ioctl outside {KVM_LAYER}")
    for component in _cycles(graph):
        problems.append("import cycle: " + " -> ".join(component))
    return problems
