"""The saved machine state's format, shared by both architectures (arch/x86_64, arch/aarch64): its one
versioned header, its one error hierarchy, the checks every field read from the wire passes, and
the timing of save and restore steps.

Everything a peer sends is checked before use (DESIGN 6): types, key sets, ranges, counts. One
reader per state kind prefixes its messages ("x86 state: vcpus[1].regs: ...").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .errors import KvmError

STATE_VERSION = 1
"""The saved-state format this daemon writes and reads up to, both architectures; a peer sees
it early (vmstate.cpu_features) and a newer one is refused before anything is built."""


class StateError(KvmError):
    """Saving or restoring state could not be done; the message names the step."""


class IncompatibleStateError(StateError):
    """The state cannot run in this VM or on this host (another CPU, a device it lacks)."""


class StateFormatError(StateError, ValueError):
    """Serialized state that is malformed: the message names the field (e.g. `vcpus[1].regs`)."""


@dataclass(frozen=True)
class RestoreReport:
    timings: dict[str, float]  # seconds per step, and "total"
    clock_advanced: bool = False  # x86: kvmclock was moved on by the host real time since the save
    # x86: (vCPU, MSR) pairs KVM refused to write although they already held the saved value.
    msrs_kept: tuple[tuple[int, int], ...] = ()


class StepTimes:
    """Seconds spent per step, summed over vCPUs (`perf_counter`; ~100 ns per step)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class _Indexed(Protocol):
    @property
    def index(self) -> int: ...


V = TypeVar("V", bound=_Indexed)


class WireReader:
    def __init__(self, label: str) -> None:
        self.label = label

    @staticmethod
    def header() -> dict[str, Any]:
        """The fields every saved state starts with."""
        return {"version": STATE_VERSION}

    def read_header(self, d: object) -> Mapping[str, Any]:
        """Check the header before anything else: a newer state may have other keys, and must
        say that it is newer, not that a key is unknown."""
        if not isinstance(d, Mapping):
            raise StateFormatError(f"{self.label}: expected a map, got {type(d).__name__}")
        if "version" not in d:
            raise StateFormatError(f"{self.label}: missing key 'version'")
        version = self.int_value(d["version"], "version", 0, (1 << 32) - 1)
        if version > STATE_VERSION:
            raise StateFormatError(
                f"{self.label}: version {version} is newer than this migrated understands "
                f"(up to {STATE_VERSION}); upgrade migrated on this host"
            )
        if version < 1:
            raise StateFormatError(f"{self.label}: version {version} is invalid (versions start at 1)")
        return d

    def error(self, where: str, key: str, what: str) -> StateFormatError:
        path = f"{where}.{key}" if where else key
        return StateFormatError(f"{self.label}: {path}: {what}")

    def fail(self, path: str, what: str) -> StateFormatError:
        return StateFormatError(f"{self.label}: {path}: {what}")

    def mapping(self, d: object, where: str, keys: frozenset[str]) -> Mapping[str, Any]:
        label = where or "top level"
        if not isinstance(d, Mapping):
            raise self.fail(label, f"expected a map, got {type(d).__name__}")
        bad = [k for k in d if not isinstance(k, str)]
        if bad:
            raise self.fail(label, f"keys must be strings, got {bad[0]!r}")
        missing = sorted(keys - d.keys())
        if missing:
            raise self.fail(label, f"missing key(s) {', '.join(missing)}")
        unknown = sorted(d.keys() - keys)
        if unknown:
            raise self.fail(label, f"unknown key(s) {', '.join(unknown)}")
        return d

    def int_value(self, value: object, path: str, lo: int, hi: int) -> int:
        if type(value) is not int:  # bool is an int subclass and is refused too
            raise self.fail(path, f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.fail(path, f"{value} is outside [{lo}, {hi}]")
        return value

    def int_field(self, m: Mapping[str, Any], key: str, where: str, lo: int, hi: int) -> int:
        return self.int_value(m[key], f"{where}.{key}" if where else key, lo, hi)

    def bytes_value(self, value: object, path: str) -> bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise self.fail(path, f"expected bytes, got {type(value).__name__}")
        return bytes(value)

    def bytes_field(self, m: Mapping[str, Any], key: str, where: str) -> bytes:
        return self.bytes_value(m[key], f"{where}.{key}" if where else key)

    def list_field(self, m: Mapping[str, Any], key: str, where: str, limit: int) -> list[Any]:
        value = m[key]
        path = f"{where}.{key}" if where else key
        if not isinstance(value, (list, tuple)):
            raise self.fail(path, f"expected a list, got {type(value).__name__}")
        if len(value) > limit:
            raise self.fail(path, f"{len(value)} entries, at most {limit} allowed")
        return list(value)

    def vcpus(self, m: Mapping[str, Any], limit: int, parse: Callable[[object, str], V]) -> tuple[V, ...]:
        """The state's `vcpus` list: at least one, at most `limit`, each parsed by `parse` and
        standing at its own index."""
        vcpu_list = self.list_field(m, "vcpus", "", limit)
        if not vcpu_list:
            raise self.error("", "vcpus", "no vCPUs")
        vcpus = tuple(parse(v, f"vcpus[{i}]") for i, v in enumerate(vcpu_list))
        for i, v in enumerate(vcpus):
            if v.index != i:
                raise self.fail(f"vcpus[{i}].index", f"{v.index}, expected {i}")
        return vcpus
