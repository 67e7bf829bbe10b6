"""vCPU and device state for the wire: what the source captures in R6.3 and the target restores
(R9) after all memory is in place. The KVM side is `migrated.kvm.x86_state` and
`migrated.kvm.aarch64`; this module frames it as DeviceState blobs (msgpack, bounded, versioned
inside) and checks compatibility early.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from .. import faults
from ..hosted import HostedVm
from ..kvm import aarch64, x86_state
from ..kvm.saved_state import STATE_VERSION
from ..kvm.system import Kvm

X86_MACHINE = "x86-machine"
ARM64_MACHINE = "arm64-machine"
# A raw guest's port devices (COM1 registers, its receive FIFO and its last 64 KiB of output;
# port 0x92): migrated.devices.PortBus.to_wire(). Well under 100 KiB.
X86_PORTS = "x86-ports"
KINDS = frozenset({X86_MACHINE, ARM64_MACHINE, X86_PORTS})
# A state blob is a few KiB per vCPU; the transport caps DeviceState at 16 MiB anyway.
_MAX_BLOB = 16 << 20


def cpu_features(kvm: Kvm) -> dict[str, Any]:
    """What the VM's CPU and state format look like, for the target to refuse an incompatible
    host up front, in the VM description: before the source stops anything."""
    if kvm.caps().arch == "aarch64":
        # KVM_ARM_PREFERRED_TARGET is the generic target on every current host; what differs
        # between hosts is checked register by register when the state is restored.
        return {"cpu_arch": "aarch64", "state_version": STATE_VERSION}
    vendor, signature = x86_state.cpu_identity(kvm.supported_cpuid())
    model = x86_state.CpuModel.from_cpuid(vendor, signature)
    return {
        "cpu_vendor": model.vendor,
        "cpu_family": model.family,
        "cpu_model": model.model,
        "state_version": STATE_VERSION,
    }


def incompatibility(features: dict[str, Any], kvm: Kvm) -> str | None:
    here = cpu_features(kvm)
    version = features.get("state_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > here["state_version"]:
        return (
            f"the VM's state format is version {version!r}; this daemon reads versions up to "
            f"{here['state_version']}: upgrade the target first"
        )
    here.pop("state_version")
    theirs = {k: features.get(k) for k in here}
    if theirs != here:
        return (
            f"CPU {theirs} differs from this host's {here}: migrated moves VMs only between "
            "hosts with the same CPU vendor, family and model"
        )
    return None


def capture(hosted: HostedVm, kvm: Kvm) -> list[tuple[str, bytes]]:
    """R6.3: every vCPU's and the VM's state; the vCPUs are parked."""
    vm = hosted.vm
    assert vm is not None
    if vm.caps.arch == "aarch64":
        # R6.3 on arm64: the LPI pending tables and the ITS tables go into guest RAM first, with
        # no vCPU running (EBUSY otherwise); only the backup bitmap sees those writes, and the
        # caller collects it after this (R6.4). Then the registers.
        if not faults.active("source-skip-its-save"):
            aarch64.save_its_tables(vm)
        arm_state = aarch64.save_vm_state(vm)
        return [(ARM64_MACHINE, msgpack.packb(arm_state.to_wire(), use_bin_type=True))]
    irqchip, pit = x86_state.detect_devices(vm)
    state = x86_state.save_vm_state(vm, irqchip=irqchip, pit=pit)
    if faults.active("source-zero-xsave"):
        state = dataclasses.replace(
            state, vcpus=tuple(dataclasses.replace(v, xsave=bytes(len(v.xsave))) for v in state.vcpus)
        )
    blobs = [(X86_MACHINE, msgpack.packb(state.to_wire(), use_bin_type=True))]
    if hosted.ports is not None:
        # The vCPUs are parked, and (vcpu.py) finished their last I/O instruction before they
        # parked, so no device access is half done.
        blobs.append((X86_PORTS, msgpack.packb(hosted.ports.bus.to_wire(), use_bin_type=True)))
    return blobs


def restore(hosted: HostedVm, kvm: Kvm, blobs: list[tuple[str, bytes]]) -> None:
    vm = hosted.vm
    assert vm is not None
    expected = [ARM64_MACHINE if vm.caps.arch == "aarch64" else X86_MACHINE]
    if hosted.ports is not None:
        expected.append(X86_PORTS)
    kinds = [kind for kind, _ in blobs]
    if kinds != expected:
        raise ValueError(f"device state kinds {kinds}: this VM restores exactly {expected}")
    wire = _unpack(blobs[0][1], "machine state")
    if hosted.ports is not None:
        # Before any vCPU runs: the first `in` from the UART must see the source's registers.
        hosted.ports.bus.load_wire(_unpack(blobs[1][1], "port device state"))
    if expected[0] == ARM64_MACHINE:
        # R9: memory is in place; restore_vm_state follows arm-vgic-its.rst's order.
        aarch64.restore_vm_state(vm, aarch64.Arm64MachineState.from_wire(wire))
        return
    state = x86_state.X86MachineState.from_wire(wire)
    # The target built the same devices from the same spec (hosted.vm_config); checked again
    # against the state by restore_vm_state.
    irqchip, pit = x86_state.detect_devices(vm)
    x86_state.restore_vm_state(vm, state, irqchip=irqchip, pit=pit)


def _unpack(blob: bytes, what: str) -> Any:
    if len(blob) > _MAX_BLOB:
        raise ValueError(f"{what} of {len(blob)} bytes exceeds {_MAX_BLOB}")
    try:
        return msgpack.unpackb(blob, raw=False, strict_map_key=True, max_bin_len=_MAX_BLOB)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise ValueError(f"{what} is not valid msgpack: {err}") from None


def estimate_ms(vcpus: int) -> float:
    """Save plus restore per vCPU (measured: 0.4-0.6 ms per vCPU each way, x86_state tests);
    the rest of the fixed downtime cost is learned by the daemon's DowntimeModel."""
    return 1.0 * vcpus


def estimate_bytes(vcpus: int) -> int:
    return 16384 * vcpus
