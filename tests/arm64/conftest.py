"""Fixtures for tests that run in the arm64 lane (`make test-arm64`, .ci/arm64/lane).

The lane boots Debian's arm64 kernel in QEMU (emulated Cortex-A "max" CPU with EL2, so the kernel
offers a real arm64 KVM) and runs `pytest -m arm64 tests/arm64` there. Mark every test here with
`pytest.mark.arm64` (a module-level `pytestmark = pytest.mark.arm64` does it).

- On a host that is not aarch64 (the x86_64 machines' `make test` deselects them with
  `-m "not arm64"`), a collected arm64 test is skipped with a pointer to the lane.
- On aarch64 (the lane) an arm64 test that skips fails the run, as `kvm` tests do on a host with
  /dev/kvm (tests/conftest.py): the lane is built to have everything these tests need.

Fixtures: `kvm` (an open /dev/kvm), `host_caps`, `vm_fd` (a fresh VM, closed afterwards),
`new_vm_fd` (as many as wanted), `enable_cap`, `set_memslot`, `guest_memory` (memfd-backed RAM).
Raw ioctls go through `migrated.kvm._libc.ioctl` with `migrated.kvm.uapi` numbers, so a test can
take steps `migrated.kvm.vm.Vm` refuses on purpose (to check what the kernel says to them).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from migrated.kvm.memory import GuestMemory
    from migrated.kvm.system import HostCaps, Kvm

LANE_MACHINE = "aarch64"
ON_ARM64 = platform.machine() == LANE_MACHINE

EnableCap = Callable[..., int]
SetMemslot = Callable[..., int]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ON_ARM64:
        return
    skip = pytest.mark.skip(reason=f"arm64 lane only ({platform.machine()} host): run `make test-arm64`")
    for item in items:
        if item.get_closest_marker("arm64") is not None:
            item.add_marker(skip)


_skipped_in_lane: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if ON_ARM64 and report.skipped and item.get_closest_marker("arm64") is not None:
        _skipped_in_lane.append(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_in_lane:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped_in_lane:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped_in_lane)} arm64 test(s) skipped in the arm64 lane:", red=True
        )
        for nodeid in _skipped_in_lane:
            terminalreporter.write_line(f"  {nodeid}", red=True)


# Imports of the package stay inside the fixtures: collecting this directory on any host must
# not need /dev/kvm, and it must not import more than pytest does.


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """/dev/kvm opened with `migrated.kvm.system.Kvm.open()` (API version checked); closed after."""
    from migrated.kvm.system import Kvm

    with Kvm.open() as handle:
        yield handle


@pytest.fixture
def host_caps(kvm: Kvm) -> HostCaps:
    """`Kvm.caps()` of the lane's kernel."""
    return kvm.caps()


@pytest.fixture
def new_vm_fd(kvm: Kvm) -> Iterator[Callable[[], int]]:
    """Factory of fresh VM fds (`KVM_CREATE_VM`, default IPA size); all are closed after the test."""
    fds: list[int] = []

    def create() -> int:
        fd = kvm.create_vm_fd()
        fds.append(fd)
        return fd

    yield create
    for fd in fds:
        os.close(fd)


@pytest.fixture
def vm_fd(new_vm_fd: Callable[[], int]) -> int:
    """One fresh VM fd: no capability enabled, no memslot, no vCPU."""
    return new_vm_fd()


@pytest.fixture
def enable_cap() -> EnableCap:
    """enable_cap(vm_fd, cap, *args) -> ioctl result; raises OSError with the kernel's errno."""
    from migrated.kvm import uapi
    from migrated.kvm._libc import ioctl

    def enable(fd: int, cap: int, *args: int) -> int:
        request = uapi.kvm_enable_cap(cap=cap)
        for i, value in enumerate(args):
            request.args[i] = value
        return ioctl(fd, uapi.KVM_ENABLE_CAP, request)

    return enable


@pytest.fixture
def set_memslot() -> SetMemslot:
    """set_memslot(vm_fd, slot, gpa, size, host_address, flags=KVM_MEM_LOG_DIRTY_PAGES).

    KVM_SET_USER_MEMORY_REGION; size 0 deletes the slot. Raises OSError with the kernel's errno.
    """
    from migrated.kvm import uapi
    from migrated.kvm._libc import ioctl

    def set_region(
        fd: int,
        slot: int,
        gpa: int,
        size: int,
        address: int,
        flags: int = uapi.KVM_MEM_LOG_DIRTY_PAGES,
    ) -> int:
        region = uapi.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=address
        )
        return ioctl(fd, uapi.KVM_SET_USER_MEMORY_REGION, region)

    return set_region


@pytest.fixture
def guest_memory() -> Iterator[Callable[[int], GuestMemory]]:
    """Factory: guest_memory(size) -> `GuestMemory.flat(size)` (memfd RAM); closed after the test."""
    from migrated.kvm.memory import GuestMemory

    made: list[GuestMemory] = []

    def make(size: int) -> GuestMemory:
        memory = GuestMemory.flat(size, name="arm64-lane")
        made.append(memory)
        return memory

    yield make
    for memory in made:
        memory.close()
