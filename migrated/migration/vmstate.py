"""vCPU and device state for the wire: what the source captures in R6.3 and the target restores
(R9) after all memory is in place. The KVM side is `migrated.kvm.x86_state`; this module frames
it as DeviceState blobs (msgpack, bounded, versioned inside) and checks compatibility early.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..hosted import HostedVm
from ..kvm import x86_state
from ..kvm.system import Kvm

X86_MACHINE = "x86-machine"
KINDS = frozenset({X86_MACHINE})
# A state blob is a few KiB per vCPU; the transport caps DeviceState at 16 MiB anyway.
_MAX_BLOB = 16 << 20


def cpu_features(kvm: Kvm) -> dict[str, Any]:
    """What the VM's CPU looks like, for the target to refuse an incompatible host up front."""
    vendor, signature = x86_state.cpu_identity(kvm.supported_cpuid())
    model = x86_state.CpuModel.from_cpuid(vendor, signature)
    return {"cpu_vendor": model.vendor, "cpu_family": model.family, "cpu_model": model.model}


def incompatibility(features: dict[str, Any], kvm: Kvm) -> str | None:
    here = cpu_features(kvm)
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
    state = x86_state.save_vm_state(vm, irqchip=False, pit=False)
    return [(X86_MACHINE, msgpack.packb(state.to_wire(), use_bin_type=True))]


def restore(hosted: HostedVm, kvm: Kvm, blobs: list[tuple[str, bytes]]) -> None:
    vm = hosted.vm
    assert vm is not None
    kinds = [kind for kind, _ in blobs]
    if kinds != [X86_MACHINE]:
        raise ValueError(f"device state kinds {kinds}: this daemon restores exactly [{X86_MACHINE!r}]")
    blob = blobs[0][1]
    if len(blob) > _MAX_BLOB:
        raise ValueError(f"machine state of {len(blob)} bytes exceeds {_MAX_BLOB}")
    try:
        wire = msgpack.unpackb(blob, raw=False, strict_map_key=True, max_bin_len=_MAX_BLOB)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise ValueError(f"machine state is not valid msgpack: {err}") from None
    state = x86_state.VmState.from_wire(wire)
    x86_state.restore_vm_state(vm, state, irqchip=False, pit=False)


def estimate_ms(vcpus: int) -> float:
    """Save plus restore per vCPU (measured: 0.4-0.6 ms per vCPU each way, x86_state tests);
    the rest of the fixed downtime cost is learned by the daemon's DowntimeModel."""
    return 1.0 * vcpus


def estimate_bytes(vcpus: int) -> int:
    return 16384 * vcpus
