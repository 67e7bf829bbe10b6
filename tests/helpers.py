"""Helpers every test package uses, in one place (importable as `helpers`: pytest puts tests/ on
sys.path for its conftest.py)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

T = TypeVar("T")

# Set on a test item whose test body failed (tests/conftest.py), so that a fixture's teardown can
# print what helps to read the failure (the daemons' warnings) and stay quiet otherwise.
CALL_FAILED = pytest.StashKey[bool]()


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


@contextmanager
def _mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax, e.g. "2m") mounted at `path`: a disk a test can fill."""
    with _mounted_tmpfs(path, f"size={size}") as mounted:
        yield mounted


def fill_disk(filler: Path) -> Path:
    """Write `filler` until its file system is full (ENOSPC, and nothing else); returns it."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\xff" * 65536)
    except OSError as err:
        assert err.errno == 28, err  # ENOSPC
    finally:
        os.close(fd)
    return filler


@contextmanager
def huge_tmpfs(path: Path, huge: str = "within_size") -> Iterator[Path]:
    """A tmpfs mounted at `path` with `huge=` (2 MiB pages for "shmem-huge" guest RAM)."""
    with _mounted_tmpfs(path, f"huge={huge}") as mounted:
        yield mounted


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def hugetlb_free() -> int:
    """Free huge pages of the default pool not promised to a mapping (HugePages_Free - Rsvd)."""
    values = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(values["HugePages_Free"].split()[0]) - int(values["HugePages_Rsvd"].split()[0])


@contextmanager
def hugetlb_pool(free: int) -> Iterator[int]:
    """Grow the hugetlb pool until at least `free` pages are free; restore nr_hugepages after.
    Yields how many are free; the caller decides what too few means (the kernel may find less
    contiguous memory than asked for)."""
    before = int(NR_HUGEPAGES.read_text())
    try:
        missing = free - hugetlb_free()
        if missing > 0:
            NR_HUGEPAGES.write_text(str(before + missing))
        yield hugetlb_free()
    finally:
        NR_HUGEPAGES.write_text(str(before))
