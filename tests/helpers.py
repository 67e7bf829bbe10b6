"""Helpers every test package uses, in one place (importable as `helpers`: pytest puts tests/ on
sys.path for its conftest.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")


def write_key(path: Path, data: bytes | None = None, mode: int = 0o600) -> Path:
    """A pre-shared peer key file: `data` (default 32 random bytes), with `mode`."""
    path.write_bytes(os.urandom(32) if data is None else data)
    path.chmod(mode)
    return path


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 20.0,
    what: str = "condition",
    *,
    interval: float = 0.05,
    healthy: Callable[[], None] | None = None,
) -> T:
    """Poll `predicate` until it returns something true, and return that; fail after `timeout`
    seconds naming `what`. `healthy` runs before every poll and raises when waiting is pointless
    (a vCPU that died would otherwise look like a timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        if healthy is not None:
            healthy()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class _Vcpu(Protocol):
    @property
    def index(self) -> int: ...

    @property
    def error(self) -> BaseException | None: ...


def vcpus_alive(vcpus: Sequence[_Vcpu]) -> Callable[[], None]:
    """A `healthy` check for wait_for: every vCPU thread is still running its guest."""

    def check() -> None:
        errors = [f"vCPU {v.index}: {v.error}" for v in vcpus if v.error is not None]
        assert not errors, errors

    return check


def wait_for_status(
    read: Callable[[], T],
    vcpus: Sequence[_Vcpu],
    done: Callable[[T], bool],
    timeout: float,
    what: str = "the guest",
) -> T:
    """Read a guest's status until `done` holds; return it. Fails (with the last status) if a
    vCPU ends or `timeout` passes."""
    last: list[T] = []

    def poll() -> bool:
        last[:] = [read()]
        return done(last[0])

    try:
        wait_for(poll, timeout, what, interval=0.005, healthy=vcpus_alive(vcpus))
    except AssertionError as err:
        raise AssertionError(f"{err}; guest status: {last[0] if last else None}") from None
    return last[0]
