"""The x86 in-kernel devices: PIC pair and IOAPIC (KVM_CREATE_IRQCHIP, which also gives every
vCPU created afterwards a LAPIC) and the i8254 PIT (KVM_CREATE_PIT2)."""

from __future__ import annotations

import ctypes
import errno
import weakref

from . import uapi as x86_uapi
from ..._libc import ioctl
from ...errors import KvmIoctlError
from ...saved_state import StateError
from ...vm import Vm


def create_irqchip(vm: Vm) -> None:
    """KVM_CREATE_IRQCHIP: PIC pair, IOAPIC, and a LAPIC for every vCPU created afterwards.

    Must come before the first vCPU (KVM refuses it after, with EINVAL: the vCPUs created
    earlier would have no LAPIC); refused here before the kernel sees it. Memslots may exist.
    With it, vCPUs other than 0 start UNINITIALIZED: see `Vcpu.set_mp_state`.
    """
    if vm.vcpus:
        raise StateError(
            "KVM_CREATE_IRQCHIP must come before any vCPU is created (each vCPU gets its LAPIC "
            f"at creation); this VM has {len(vm.vcpus)} vCPU(s)"
        )
    vm.ioctl("KVM_CREATE_IRQCHIP", x86_uapi.KVM_CREATE_IRQCHIP)
    known = _DETECTED.get(vm)
    _DETECTED[vm] = (True, known[1] if known is not None else _has_pit(vm))


def create_pit2(vm: Vm, flags: int = x86_uapi.KVM_PIT_SPEAKER_DUMMY) -> None:
    """KVM_CREATE_PIT2: the i8254 PIT in the kernel, after `create_irqchip` (api.rst: "only valid
    after enabling in-kernel irqchip support"). KVM_PIT_SPEAKER_DUMMY (the default) lets the
    kernel answer port 0x61 too, which this VMM does not emulate."""
    vm.ioctl("KVM_CREATE_PIT2", x86_uapi.KVM_CREATE_PIT2, x86_uapi.kvm_pit_config(flags=flags))
    known = _DETECTED.get(vm)
    _DETECTED[vm] = (known[0] if known is not None else _has_irqchip(vm), True)


def _probe(vm: Vm, step: str, request: int, arg: ctypes.Structure) -> bool:
    """True when the VM has the device: KVM answers ENXIO to GET_IRQCHIP / GET_PIT2 without it."""
    try:
        ioctl(vm.fd, request, arg)
    except OSError as err:
        if err.errno == errno.ENXIO:
            return False
        raise KvmIoctlError(step, err) from err
    return True


def _has_irqchip(vm: Vm) -> bool:
    chip = x86_uapi.kvm_irqchip(chip_id=x86_uapi.KVM_IRQCHIP_PIC_MASTER)
    return _probe(vm, "KVM_GET_IRQCHIP", x86_uapi.KVM_GET_IRQCHIP, chip)


def _has_pit(vm: Vm) -> bool:
    return _probe(vm, "KVM_GET_PIT2", x86_uapi.KVM_GET_PIT2, x86_uapi.kvm_pit_state2())


# What each VM has: a device is never removed, and only the two functions above (the only
# KVM_CREATE_IRQCHIP and KVM_CREATE_PIT2 of the daemon; VM ioctls come from this process alone)
# add one, recording it as they do, so that the build (`X86_64.before_vcpus`) leaves the answer
# here and no state save or restore asks KVM inside the downtime.
_DETECTED: weakref.WeakKeyDictionary[Vm, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def detect_devices(vm: Vm) -> tuple[bool, bool]:
    """(has in-kernel irqchip, has in-kernel PIT), asked of KVM (once per VM: `_DETECTED`)."""
    known = _DETECTED.get(vm)
    if known is None:
        known = _DETECTED[vm] = (_has_irqchip(vm), _has_pit(vm))
    return known


def check_devices(vm: Vm, irqchip: bool, pit: bool, side: str) -> None:
    has_irqchip, has_pit = detect_devices(vm)
    for name, said, has in (("irqchip", irqchip, has_irqchip), ("PIT", pit, has_pit)):
        if said != has:
            raise StateError(
                f"{side}: told {name}={said}, but the VM "
                + ("has an" if has else "has no")
                + f" in-kernel {name}"
                + ("" if has else " (create it before the vCPUs: create_irqchip / create_pit2)")
            )
