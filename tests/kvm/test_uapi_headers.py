"""Every number in migrated/kvm/uapi.py and the per-arch tables (migrated/kvm/arch/x86_64/uapi.py,
migrated/kvm/arch/aarch64/uapi.py), checked against what the C compiler makes of the headers.

A generated C program prints each constant, struct size, field offset and field size; it is built
against the host's <linux/kvm.h> (Debian 12: Linux 6.1) and against newer headers from
`.ci/fetch-headers`. The common table and the x86 one (`x86_uapi.X86_STRUCTS` and its constants)
are checked against the x86_64 headers. The arm64 names (`arm_uapi.ARM64_ONLY`, `arm_uapi.ARM64_STRUCTS`) are checked against
the aarch64 <asm/kvm.h> of the newer headers instead, together with the generic names the arm64
code uses (`arm_uapi.ARM64_SHARED`): the host gcc builds that program with the aarch64 include
directory ahead of its own, and fixed-width types give the same layout on both.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from migrated.kvm import uapi
from migrated.kvm.arch.aarch64 import uapi as arm_uapi
from migrated.kvm.arch.x86_64 import uapi as x86_uapi

REPO = Path(__file__).resolve().parents[2]
HOST_KVM_H = "/usr/include/linux/kvm.h"
MULTIARCH = "x86_64-linux-gnu"  # the common and x86 tables describe the x86_64 layout
ARM64_MULTIARCH = "aarch64-linux-gnu"  # ... and the arm64 table the aarch64 one
ABSENT = "ABSENT"


@dataclass(frozen=True)
class Probe:
    """One number to ask the C compiler for."""

    name: str  # as reports show it, e.g. "KVM_RUN" or "offsetof(struct kvm_run, mmio.len)"
    expr: str  # the C expression
    ours: int
    macro: str | None = None  # reported absent, not a compile error, when this is undefined


def all_constants() -> dict[str, int]:
    """Every constant of the common table and the per-arch ones, which define no name twice."""
    tables = {"common": uapi.constants(), "x86_64": x86_uapi.constants(), "aarch64": arm_uapi.constants()}
    merged: dict[str, int] = {}
    for table, names in tables.items():
        twice = sorted(merged.keys() & names.keys())
        assert not twice, f"defined in {table} and another table: {twice}"
        merged.update(names)
    return merged


def x86_structs() -> dict[str, type[ctypes.Structure]]:
    """The structs checked against the x86_64 headers: the common table's and the x86 one's."""
    twice = sorted(uapi.STRUCTS.keys() & x86_uapi.X86_STRUCTS.keys())
    assert not twice, f"structs in both the common and the x86 table: {twice}"
    return {**uapi.STRUCTS, **x86_uapi.X86_STRUCTS}


def constant_probes(exclude: frozenset[str] = frozenset(), only: frozenset[str] | None = None) -> list[Probe]:
    # Every constant, ioctl numbers included, is a macro in the headers, so #ifdef finds them all.
    return [
        Probe(name, name, value, macro=name)
        for name, value in sorted(all_constants().items())
        if name not in exclude and (only is None or name in only)
    ]


def _members(
    cls: type[ctypes.Structure | ctypes.Union],
    renames: dict[str, str],
    skip: frozenset[str],
    c_prefix: str,
    base: int,
) -> Iterator[tuple[str, int, int]]:
    """(C member designator, our offset, our size) of every field, nested ones included."""
    for name, ctype, *_ in cls._fields_:
        if name in skip:
            continue
        field = getattr(cls, name)
        c_name = renames.get(name, name)
        if issubclass(ctype, (ctypes.Structure, ctypes.Union)) and c_name != name:
            # A renamed aggregate stands for an anonymous C union (kvm_run's exit union goes by
            # its member `io`): C names its members, `io` among them, without a prefix, and has
            # no name for the union itself to take the size of.
            yield from _members(ctype, {}, frozenset(), c_prefix, base + field.offset)
            continue
        yield c_prefix + c_name, base + field.offset, field.size
        if issubclass(ctype, (ctypes.Structure, ctypes.Union)):
            yield from _members(ctype, {}, frozenset(), f"{c_prefix}{c_name}.", base + field.offset)


def struct_probes(
    structs: dict[str, type[ctypes.Structure]] | None = None,
    unchecked: dict[str, frozenset[str]] | None = None,
) -> list[Probe]:
    probes = []
    for c_struct, cls in (x86_structs() if structs is None else structs).items():
        size = f"sizeof(struct {c_struct})"
        probes.append(Probe(size, size, ctypes.sizeof(cls)))
        renames = uapi.C_FIELD_NAMES.get(c_struct, {})
        skip = (uapi.UNCHECKED_FIELDS if unchecked is None else unchecked).get(c_struct, frozenset())
        for member, offset, field_size in _members(cls, renames, skip, "", 0):
            where = f"offsetof(struct {c_struct}, {member})"
            size = f"sizeof(((struct {c_struct} *)0)->{member})"
            probes += [Probe(where, where, offset), Probe(size, size, field_size)]
    return probes


def c_program(probes: Sequence[Probe]) -> str:
    """C source printing "name<TAB>value" (or "name<TAB>ABSENT") for each probe."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/kvm.h>", ""]
    lines += ["int main(void)", "{"]
    for p in probes:
        # unsigned long: ioctl numbers have bit 31 set and must not come out negative.
        value = f'    printf("%s\\t%lu\\n", "{p.name}", (unsigned long)({p.expr}));'
        if p.macro is None:
            lines.append(value)
        else:
            absent = f'    printf("%s\\t{ABSENT}\\n", "{p.name}");'
            lines += [f"#ifdef {p.macro}", value, "#else", absent, "#endif"]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def c_values(probes: Sequence[Probe], tmp_path: Path, include_dirs: Sequence[Path] = ()) -> dict[str, int | None]:
    """What C says for each probe (None: absent), built with include_dirs ahead of the system's."""
    source, program = tmp_path / "probe.c", tmp_path / "probe"
    source.write_text(c_program(probes))
    isystem = [arg for d in include_dirs for arg in ("-isystem", str(d))]
    subprocess.run(["gcc", "-Wall", *isystem, "-o", str(program), str(source)], check=True)
    out = subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout
    values: dict[str, int | None] = {}
    for line in out.splitlines():
        name, value = line.split("\t")
        values[name] = None if value == ABSENT else int(value)
    return values


def mismatches(probes: Sequence[Probe], theirs: dict[str, int | None], header: str) -> list[str]:
    problems = []
    for p in probes:
        ours, c = p.ours % (1 << 64), theirs[p.name]  # both as C's unsigned long
        if c is None:
            problems.append(f"{p.name}: absent from {header} (ours {ours} = {ours:#x})")
        elif c != ours:
            problems.append(f"{p.name}: ours {ours} = {ours:#x}, C {c} = {c:#x}")
    return problems


def check(probes: Sequence[Probe], tmp_path: Path, include_dirs: Sequence[Path], header: str) -> None:
    problems = mismatches(probes, c_values(probes, tmp_path, include_dirs), header)
    assert not problems, f"{len(problems)} mismatches with {header}:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def newer_headers() -> Path:
    """DIR holding newer headers: $MIGRATED_NEWER_HEADERS as .ci/run sets it, or a user cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    directory = Path(os.environ.get("MIGRATED_NEWER_HEADERS") or cache / "migrated" / "headers")
    # Always run it: it returns at once once DIR is complete, and repairs a half-filled DIR.
    try:
        subprocess.run(
            ["bash", str(REPO / ".ci" / "fetch-headers"), str(directory)],
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
        return directory
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        # TimeoutExpired keeps bytes even with text=True.
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        error = f"{e}\n{stderr or ''}"
    pytest.fail(
        f"newer kernel headers could not be fetched into {directory}:\n{error}\n"
        "Get them with `.ci/fetch-headers DIR` (as root, with Debian's archive reachable) "
        "and run the tests with MIGRATED_NEWER_HEADERS=DIR.",
        pytrace=False,
    )


def test_host_headers_match(tmp_path: Path) -> None:
    probes = constant_probes(exclude=uapi.NEWER_THAN_HOST_HEADERS | arm_uapi.ARM64_ONLY) + struct_probes()
    check(probes, tmp_path, [], HOST_KVM_H)


def test_newer_headers_match(tmp_path: Path, newer_headers: Path) -> None:
    include = newer_headers / "usr" / "include"
    probes = constant_probes(exclude=arm_uapi.ARM64_ONLY) + struct_probes()
    check(probes, tmp_path, [include, include / MULTIARCH], str(include / "linux" / "kvm.h"))


def arm64_probes() -> list[Probe]:
    shared_structs = {name: cls for name, cls in uapi.STRUCTS.items() if name in arm_uapi.ARM64_SHARED}
    return (
        constant_probes(only=arm_uapi.ARM64_ONLY | arm_uapi.ARM64_SHARED)
        + struct_probes(arm_uapi.ARM64_STRUCTS, arm_uapi.ARM64_UNCHECKED_FIELDS)
        + struct_probes(shared_structs)
        + core_register_probes()
    )


def core_register_probes() -> list[Probe]:
    """Core register ids as asm/kvm.h builds them (KVM_REG_ARM_CORE_REG) against ours."""
    from migrated.kvm.arch import aarch64

    probes = []
    for name, ours in sorted(aarch64.CORE_REGS.items()):
        member = aarch64.CORE_REG_MEMBERS[name]
        size = {8: "U64", 16: "U128", 4: "U32"}[aarch64.reg_size(ours)]
        expr = f"KVM_REG_ARM64 | KVM_REG_SIZE_{size} | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG({member})"
        probes.append(Probe(f"core register {name}", expr, ours))
    return probes


def test_aarch64_headers_match(tmp_path: Path, newer_headers: Path) -> None:
    include = newer_headers / "usr" / "include"
    header = include / ARM64_MULTIARCH / "asm" / "kvm.h"
    assert header.is_file(), f"{header} is missing: .ci/fetch-headers should have unpacked it"
    check(arm64_probes(), tmp_path, [include, include / ARM64_MULTIARCH], str(header))


def test_arm64_names_are_defined_and_disjoint() -> None:
    names = uapi.constants().keys() | uapi.STRUCTS.keys()
    assert sorted(arm_uapi.ARM64_SHARED - names) == []
    assert sorted(arm_uapi.ARM64_ONLY - arm_uapi.constants().keys()) == []
    assert arm_uapi.ARM64_ONLY.isdisjoint(uapi.constants().keys() | x86_uapi.constants().keys())
    # ARM64_ONLY is left out of the x86 checks: no name may be both arm64-only and checked there.
    assert arm_uapi.ARM64_ONLY.isdisjoint(arm_uapi.ARM64_SHARED)
    assert arm_uapi.ARM64_ONLY.isdisjoint(uapi.NEWER_THAN_HOST_HEADERS)
    # Two structs share their C name with x86's and differ in layout; every other arm64 struct
    # must stay out of STRUCTS, which the x86 headers check.
    assert arm_uapi.ARM64_STRUCTS.keys() & x86_structs().keys() == {"kvm_regs", "kvm_vcpu_events"}


def test_vcpu_events_ioctls_fit_both_layouts() -> None:
    # KVM_GET/SET_VCPU_EVENTS are common and encode a size; each arch's struct must have it.
    for cls in (x86_uapi.kvm_vcpu_events, arm_uapi.kvm_vcpu_events_arm64):
        assert ctypes.sizeof(cls) == uapi._VCPU_EVENTS_SIZE, cls


def _nested(cls: type[ctypes.Structure | ctypes.Union]) -> Iterator[type]:
    for _, ctype, *_ in cls._fields_:
        while issubclass(ctype, ctypes.Array):
            ctype = ctype._type_
        if issubclass(ctype, (ctypes.Structure, ctypes.Union)):
            yield ctype
            yield from _nested(ctype)


@pytest.mark.parametrize(
    ("module", "table"),
    [(uapi, uapi.STRUCTS), (x86_uapi, x86_uapi.X86_STRUCTS), (arm_uapi, arm_uapi.ARM64_STRUCTS)],
    ids=["common", "x86_64", "aarch64"],
)
def test_every_struct_is_checked(module: ModuleType, table: dict[str, type[ctypes.Structure]]) -> None:
    """A struct defined in a table's module is in its table or nested in one that is."""
    checked = set(table.values()) | {nested for cls in table.values() for nested in _nested(cls)}
    defined = {
        cls
        for cls in vars(module).values()
        if isinstance(cls, type)
        and issubclass(cls, (ctypes.Structure, ctypes.Union))
        and cls.__module__ == module.__name__
    }
    assert sorted(cls.__name__ for cls in defined - checked) == []


def test_newer_than_host_headers_are_absent_from_host(tmp_path: Path) -> None:
    # The exclusion list must not hide a constant the host headers could check.
    assert uapi.NEWER_THAN_HOST_HEADERS <= uapi.constants().keys()
    probes = [p for p in constant_probes() if p.name in uapi.NEWER_THAN_HOST_HEADERS]
    values = c_values(probes, tmp_path)
    assert [p.name for p in probes if values[p.name] is not None] == []


def test_absent_and_wrong_constants_are_reported(tmp_path: Path) -> None:
    fake = tmp_path / "include"
    (fake / "linux").mkdir(parents=True)
    (fake / "linux" / "kvm.h").write_text(
        "#include <asm-generic/ioctl.h>\n"
        "#define KVM_RIGHT 7\n"
        "#define KVM_WRONG 2\n"
        "#define KVM_HIGH_IOCTL _IOWR(0xAE, 0x05, char[8])\n"
    )
    probes = [
        Probe("KVM_RIGHT", "KVM_RIGHT", 7, macro="KVM_RIGHT"),
        Probe("KVM_WRONG", "KVM_WRONG", 1, macro="KVM_WRONG"),
        Probe("KVM_MISSING", "KVM_MISSING", 3, macro="KVM_MISSING"),
        Probe("KVM_HIGH_IOCTL", "KVM_HIGH_IOCTL", uapi._iowr(0x05, 8), macro="KVM_HIGH_IOCTL"),
    ]
    header = str(fake / "linux" / "kvm.h")
    assert mismatches(probes, c_values(probes, tmp_path, [fake]), header) == [
        "KVM_WRONG: ours 1 = 0x1, C 2 = 0x2",
        f"KVM_MISSING: absent from {header} (ours 3 = 0x3)",
    ]
