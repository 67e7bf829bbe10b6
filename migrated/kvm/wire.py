"""Checks for saved machine state read back from the wire (x86_state, aarch64).

Everything a peer sends is checked before use (DESIGN 6): types, key sets, ranges, counts. One
reader per state kind prefixes its messages ("x86 state: vcpus[1].regs: ...").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class StateFormatError(ValueError):
    """Serialized state that is malformed: the message names the field (e.g. `vcpus[1].regs`)."""


class WireReader:
    def __init__(self, label: str) -> None:
        self.label = label

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
