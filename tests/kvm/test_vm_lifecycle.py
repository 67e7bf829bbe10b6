"""The VM layer on real KVM: creation order (R1, R2), bad input, teardown that leaks nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from migrated.kvm import uapi
from migrated.kvm import vm as vm_module
from migrated.kvm.errors import (
    DirtyTrackingOrderError,
    KvmUnavailableError,
    VmConfigError,
)
from migrated.kvm.memory import GuestMemory
from migrated.kvm.system import Kvm
from migrated.kvm.arch import create_vm, host_arch
from migrated.kvm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm


@pytest.fixture
def vm_ioctls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every ioctl request the VM layer sends on a VM fd, in order."""
    sent: list[int] = []
    real = vm_module.ioctl

    def recording(fd: int, request: int, arg: Any = 0) -> int:
        sent.append(request)
        return real(fd, request, arg)

    monkeypatch.setattr(vm_module, "ioctl", recording)
    return sent


def test_ring_after_vcpu_is_refused_before_the_kernel_sees_it(kvm: Kvm, vm_ioctls: list[int]) -> None:
    vm = Vm(kvm, kvm.caps(), host_arch())
    try:
        vm.create_vcpu(0)
        with pytest.raises(DirtyTrackingOrderError, match="R1.*1 vCPU"):
            vm.enable_dirty_ring(1 << 16)
        assert uapi.KVM_ENABLE_CAP not in vm_ioctls
    finally:
        vm.close()


def test_ring_after_memslot_is_refused_before_the_kernel_sees_it(kvm: Kvm, vm_ioctls: list[int]) -> None:
    vm = Vm(kvm, kvm.caps(), host_arch())
    try:
        vm.add_memory(GuestMemory.flat(2 << 20))
        with pytest.raises(DirtyTrackingOrderError, match="R1.*1 memslot"):
            vm.enable_dirty_ring(1 << 16)
        assert uapi.KVM_ENABLE_CAP not in vm_ioctls
    finally:
        vm.close()


def test_with_bitmap_after_memslot_is_refused_before_the_kernel_sees_it(kvm: Kvm, vm_ioctls: list[int]) -> None:
    vm = Vm(kvm, kvm.caps(), host_arch())
    try:
        vm.enable_dirty_ring(1 << 16)
        assert vm_ioctls.count(uapi.KVM_ENABLE_CAP) == 1
        vm.add_memory(GuestMemory.flat(2 << 20))
        with pytest.raises(DirtyTrackingOrderError, match="R2.*before the first memslot"):
            vm.enable_ring_with_bitmap()
        assert vm_ioctls.count(uapi.KVM_ENABLE_CAP) == 1
    finally:
        vm.close()


def test_with_bitmap_before_ring_is_refused(kvm: Kvm, vm_ioctls: list[int]) -> None:
    vm = Vm(kvm, kvm.caps(), host_arch())
    try:
        with pytest.raises(DirtyTrackingOrderError, match="R2.*after the dirty ring"):
            vm.enable_ring_with_bitmap()
        assert uapi.KVM_ENABLE_CAP not in vm_ioctls
    finally:
        vm.close()


def test_manual_protect_is_never_combined_with_the_ring(kvm: Kvm, vm_ioctls: list[int]) -> None:
    vm = Vm(kvm, kvm.caps(), host_arch())
    try:
        vm.enable_dirty_ring(1 << 16)
        with pytest.raises(DirtyTrackingOrderError, match="R4b"):
            vm.enable_manual_dirty_log_protect()
        assert vm_ioctls.count(uapi.KVM_ENABLE_CAP) == 1
    finally:
        vm.close()


def test_kernel_itself_refuses_the_ring_after_a_vcpu(kvm: Kvm) -> None:
    """What our check saves us from: the kernel's own EINVAL for R1, on this host."""
    from migrated.kvm._libc import ioctl

    fd = kvm.create_vm_fd()
    vcpu_fd = ioctl(fd, uapi.KVM_CREATE_VCPU, 0)
    try:
        cap = uapi.kvm_enable_cap(cap=uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
        cap.args[0] = 1 << 16
        with pytest.raises(OSError) as excinfo:
            ioctl(fd, uapi.KVM_ENABLE_CAP, cap)
        assert excinfo.value.errno == 22
    finally:
        os.close(vcpu_fd)
        os.close(fd)


def test_create_orders_steps_ring_memslot_vcpu(kvm: Kvm, vm_ioctls: list[int]) -> None:
    with create_vm(kvm, VmConfig(memory_bytes=4 << 20, vcpus=2)) as vm:
        assert vm.dirty_tracking == "ring"
    enable = vm_ioctls.index(uapi.KVM_ENABLE_CAP)
    memslot = vm_ioctls.index(uapi.KVM_SET_USER_MEMORY_REGION)
    vcpu = vm_ioctls.index(uapi.KVM_CREATE_VCPU)
    assert enable < memslot < vcpu


@pytest.mark.parametrize(
    ("ring_bytes", "message"),
    [
        (3 << 12, "must be a power of two"),
        (0, "must be a power of two"),
        (1 << 21, "powers of two from 4096 to"),
        (1 << 10, "powers of two from 4096 to"),
    ],
)
def test_bad_ring_size_names_what_is_allowed(kvm: Kvm, ring_bytes: int, message: str) -> None:
    with pytest.raises(VmConfigError, match=message):
        create_vm(kvm, VmConfig(memory_bytes=4 << 20, dirty_tracking="ring", ring_bytes=ring_bytes))


def test_too_many_vcpus_names_the_limit(kvm: Kvm) -> None:
    limit = kvm.caps().max_vcpus
    with pytest.raises(VmConfigError, match=f"{limit + 1} vCPUs requested: this host allows 1 to {limit}"):
        create_vm(kvm, VmConfig(memory_bytes=4 << 20, vcpus=limit + 1))


def test_unknown_tracking_mode_names_the_choices(kvm: Kvm) -> None:
    with pytest.raises(VmConfigError, match="allowed are auto, ring, bitmap"):
        create_vm(kvm, VmConfig(memory_bytes=4 << 20, dirty_tracking="rings"))  # type: ignore[arg-type]


def test_missing_device_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist: this host has no KVM"):
        Kvm.open(str(tmp_path / "kvm"))


def test_no_permission_is_a_clear_error() -> None:
    """Open /dev/kvm as an unprivileged user (uid 65534) in a child process.

    The child imports first and drops root afterwards: the interpreter's own files may not be
    readable by that user.
    """
    if os.geteuid() != 0:
        pytest.fail("this test needs root (to become a user without access to /dev/kvm)")
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.fail("/dev/kvm is world-accessible here; the permission error cannot be shown")
    code = (
        "import os\n"
        "from migrated.kvm.system import Kvm\n"
        "from migrated.kvm.errors import KvmUnavailableError\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n    Kvm.open()\nexcept KvmUnavailableError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    ).stdout
    assert "no permission to open /dev/kvm: run as root or as a member of the group" in out


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_200_vms_leave_fds_and_rss_where_they_started(kvm: Kvm, mode: str) -> None:
    config = VmConfig(memory_bytes=16 << 20, vcpus=2, dirty_tracking=mode)  # type: ignore[arg-type]
    with create_vm(kvm, config) as warmup:
        warmup.ram[::4096] = 1
    fds, rss = _fds(), _rss_kib()
    for _ in range(200):
        with create_vm(kvm, config) as vm:
            vm.ram[::4096] = 1  # touch every page: RAM that was not freed would show in RSS
            vm.start(running=False)
    assert _fds() == fds
    # 200 VMs x 16 MiB touched = 3.2 GiB had they leaked; allow allocator noise only.
    assert _rss_kib() - rss < 8 * 1024
