"""Errors of the KVM layer. Each message names what is wrong and what is allowed."""

from __future__ import annotations


class KvmError(Exception):
    """Base of every error the KVM layer raises."""


class KvmUnavailableError(KvmError):
    """/dev/kvm is missing, or we may not open it."""


class KvmCapabilityError(KvmError):
    """The host's KVM lacks something this configuration needs."""


class VmConfigError(KvmError, ValueError):
    """A VM configuration value outside what this host allows."""


class DirtyTrackingOrderError(KvmError):
    """A dirty-tracking step asked for in an order the kernel's rules forbid (DESIGN R1/R2)."""


class KvmIoctlError(KvmError):
    """An ioctl failed; the message names the step. The OSError is the __cause__."""

    def __init__(self, step: str, err: OSError) -> None:
        super().__init__(f"{step} failed: {err.strerror} (errno {err.errno})")
        self.step = step
        self.errno = err.errno


class DirtyRingLivelockError(KvmError):
    """A vCPU keeps exiting with a full dirty ring that holds nothing to harvest.

    Seen on PVM hosts when a ring fills while the guest runs emulated code: pages are lost, so
    the tracking can no longer be trusted (HOST-NOTES.md).
    """


class VcpuError(KvmError):
    """A vCPU stopped for a reason the VMM cannot continue from (shutdown, internal error)."""
