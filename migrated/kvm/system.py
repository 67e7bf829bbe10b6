"""/dev/kvm: opening it, what it offers (capabilities), and host-wide queries."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import uapi
from ._libc import ioctl
from .errors import KvmCapabilityError, KvmIoctlError, KvmUnavailableError

DEFAULT_DEVICE = "/dev/kvm"
_PVM_MODULE = Path("/sys/module/kvm_pvm")


@dataclass(frozen=True)
class HostCaps:
    """What this host's KVM offers that matters to migrated."""

    device: str
    api_version: int
    arch: str
    pvm: bool
    dirty_ring_max_bytes: int  # KVM_CAP_DIRTY_LOG_RING_ACQ_REL or _RING; 0 = no ring
    dirty_ring_acq_rel: bool
    dirty_ring_with_bitmap: bool
    manual_dirty_log_protect: int  # the flags KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 reports
    max_vcpus: int
    recommended_vcpus: int
    max_vcpu_id: int
    memslots: int
    immediate_exit: bool
    xsave2_bytes: int
    vcpu_mmap_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Kvm:
    """An open /dev/kvm. Close it with `close()` or use it as a context manager."""

    def __init__(self, fd: int, device: str) -> None:
        self.fd = fd
        self.device = device
        self._supported_cpuid: list[uapi.kvm_cpuid_entry2] | None = None
        self._msr_indices: list[int] | None = None

    @classmethod
    def open(cls, device: str = DEFAULT_DEVICE) -> Kvm:
        try:
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{device} does not exist: this host has no KVM (load kvm_intel/kvm_amd, or run "
                "on a machine with hardware virtualization)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {device}: run as root or as a member of the group that "
                f"owns it (group id {_owner_gid(device)})"
            ) from None
        except OSError as err:
            raise KvmUnavailableError(f"cannot open {device}: {err.strerror}") from err
        kvm = cls(fd, device)
        try:
            version = kvm.api_version()
        except BaseException:
            kvm.close()
            raise
        if version != uapi.KVM_API_VERSION:
            kvm.close()
            raise KvmCapabilityError(f"{device} speaks KVM API {version}; migrated needs API {uapi.KVM_API_VERSION}")
        return kvm

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl(self, step: str, request: int, arg: Any = 0) -> int:
        try:
            return ioctl(self.fd, request, arg)
        except OSError as err:
            raise KvmIoctlError(step, err) from err

    def api_version(self) -> int:
        return self._ioctl("KVM_GET_API_VERSION", uapi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return self._ioctl("KVM_CHECK_EXTENSION", uapi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self._ioctl("KVM_GET_VCPU_MMAP_SIZE", uapi.KVM_GET_VCPU_MMAP_SIZE)

    def create_vm_fd(self, machine_type: int = 0) -> int:
        return self._ioctl("KVM_CREATE_VM", uapi.KVM_CREATE_VM, machine_type)

    def supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID (asked once; the answer does not change while we run)."""
        if self._supported_cpuid is None:
            self._supported_cpuid = self._query_supported_cpuid()
        return list(self._supported_cpuid)

    def _query_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        # The kernel says E2BIG until the buffer is large enough.
        count = 64
        while True:
            buf, header, entries = _cpuid_buffer(count)
            try:
                ioctl(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as err:
                if err.errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise KvmIoctlError("KVM_GET_SUPPORTED_CPUID", err) from err
            return [uapi.kvm_cpuid_entry2.from_buffer_copy(entries[i]) for i in range(header.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST (asked once, as the supported CPUID: every state save and
        restore reads it, in the downtime)."""
        if self._msr_indices is None:
            self._msr_indices = self._query_msr_index_list()
        return list(self._msr_indices)

    def _query_msr_index_list(self) -> list[int]:
        count = 64
        while True:
            header_size = ctypes.sizeof(uapi.kvm_msr_list)
            buf = (ctypes.c_uint8 * (header_size + 4 * count))()
            header = uapi.kvm_msr_list.from_buffer(buf)
            header.nmsrs = count
            try:
                ioctl(self.fd, uapi.KVM_GET_MSR_INDEX_LIST, buf)
            except OSError as err:
                if err.errno == errno.E2BIG and count < 4096:
                    count = max(count * 2, header.nmsrs)
                    continue
                raise KvmIoctlError("KVM_GET_MSR_INDEX_LIST", err) from err
            indices = (ctypes.c_uint32 * header.nmsrs).from_buffer(buf, header_size)
            return list(indices)

    def caps(self) -> HostCaps:
        acq_rel = self.check_extension(uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
        ring = acq_rel or self.check_extension(uapi.KVM_CAP_DIRTY_LOG_RING)
        recommended = self.check_extension(uapi.KVM_CAP_NR_VCPUS)
        return HostCaps(
            device=self.device,
            api_version=self.api_version(),
            arch=os.uname().machine,
            pvm=_PVM_MODULE.exists(),
            dirty_ring_max_bytes=ring,
            dirty_ring_acq_rel=acq_rel > 0,
            dirty_ring_with_bitmap=self.check_extension(uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) > 0,
            manual_dirty_log_protect=self.check_extension(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
            # api.rst: "if KVM_CAP_MAX_VCPUS returns 0, use KVM_CAP_NR_VCPUS instead".
            max_vcpus=self.check_extension(uapi.KVM_CAP_MAX_VCPUS) or recommended or 4,
            recommended_vcpus=recommended or 4,
            max_vcpu_id=self.check_extension(uapi.KVM_CAP_MAX_VCPU_ID),
            memslots=self.check_extension(uapi.KVM_CAP_NR_MEMSLOTS),
            immediate_exit=self.check_extension(uapi.KVM_CAP_IMMEDIATE_EXIT) > 0,
            xsave2_bytes=self.check_extension(uapi.KVM_CAP_XSAVE2),
            vcpu_mmap_bytes=self.vcpu_mmap_size(),
        )


def _cpuid_buffer(
    count: int,
) -> tuple[ctypes.Array[ctypes.c_uint8], uapi.kvm_cpuid2, ctypes.Array[uapi.kvm_cpuid_entry2]]:
    header_size = ctypes.sizeof(uapi.kvm_cpuid2)
    buf = (ctypes.c_uint8 * (header_size + ctypes.sizeof(uapi.kvm_cpuid_entry2) * count))()
    header = uapi.kvm_cpuid2.from_buffer(buf)
    header.nent = count
    entries = (uapi.kvm_cpuid_entry2 * count).from_buffer(buf, header_size)
    return buf, header, entries


def cpuid_buffer(entries: list[uapi.kvm_cpuid_entry2]) -> ctypes.Array[ctypes.c_uint8]:
    """A `struct kvm_cpuid2` with `entries`, for KVM_SET_CPUID2."""
    buf, header, slots = _cpuid_buffer(len(entries))
    for i, entry in enumerate(entries):
        slots[i] = entry
    header.nent = len(entries)
    return buf


def _owner_gid(path: str) -> int | str:
    try:
        return os.stat(path).st_gid
    except OSError:
        return "unknown"
