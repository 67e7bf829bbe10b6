"""vCPU and device state for the wire: what the source captures in R6.3 and the target restores
(R9) after all memory is in place. The KVM side is the arch object's (`migrated.kvm.arch`); this
module frames it as DeviceState blobs (msgpack, bounded, versioned inside) and checks
compatibility early.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from .. import faults
from ..hosted import HostedVm
from ..kvm.arch import ARCHES, arch_of, host_arch
from ..kvm.arch.x86_64 import host_facts
from ..kvm.arch.x86_64.flatstate import zero_flat_xsave
from ..kvm.saved_state import STATE_VERSION
from ..kvm.system import Kvm
from ..kvm.vm import Vm
from .timeline import Timeline

# A raw guest's port devices (COM1 registers, its receive FIFO and its last 64 KiB of output;
# port 0x92): migrated.devices.PortBus.to_wire(). Well under 100 KiB.
X86_PORTS = "x86-ports"
X86_MACHINE = ARCHES["x86_64"].state_kind
KINDS = frozenset(
    {
        *(arch.state_kind for arch in ARCHES.values()),
        *(arch.flat_state_kind for arch in ARCHES.values() if arch.flat_state_kind is not None),
        X86_PORTS,
    }
)
# A state blob is a few KiB per vCPU; the transport caps DeviceState at 16 MiB anyway.
_MAX_BLOB = 16 << 20


def cpu_features(kvm: Kvm, vm: Vm | None = None) -> dict[str, Any]:
    """What the VM's CPU and state format look like, for the target to refuse an incompatible
    host up front, in the VM description: before the source stops anything. With `vm`, also
    what the target builds the VM with (`Arch.vm_features`), so that its downtime need not."""
    arch = host_arch(kvm.caps().arch)
    machine = arch.vm_features(vm) if vm is not None else {}
    return {**arch.cpu_features(kvm), **machine, "state_version": STATE_VERSION}


def incompatibility(features: dict[str, Any], kvm: Kvm) -> str | None:
    here = cpu_features(kvm)
    version = features.get("state_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > here["state_version"]:
        return (
            f"the VM's state format is version {version!r}; this daemon reads versions up to "
            f"{here['state_version']}: upgrade the target first"
        )
    here.pop("state_version")
    # Checked as the state will be (x86 check_compatible), not for equality: the source's MSRs
    # must all be known here (this KVM may know more), its XSAVE area must fit. The transport
    # bounded both (transport/events.py); an older source sends neither, and the restore checks.
    our_msrs = here.pop("msr_indices", None)
    their_msrs = features.get("msr_indices")
    theirs = {k: features.get(k) for k in here}
    if theirs != here:
        return (
            f"CPU {theirs} differs from this host's {here}: migrated moves VMs only between "
            "hosts with the same CPU vendor, family and model"
        )
    if our_msrs is not None and their_msrs is not None:
        unknown = sorted(set(their_msrs) - set(our_msrs))
        if unknown:
            return (
                f"{len(unknown)} MSR(s) of the VM are unknown to this host's KVM: "
                + ", ".join(f"{index:#x}" for index in unknown[:8])
                + (" ..." if len(unknown) > 8 else "")
            )
    their_xsave = features.get("xsave_bytes")
    if their_xsave is not None and their_xsave > (ours := host_facts(kvm).xsave_bytes):
        return (
            f"the VM's XSAVE area is {their_xsave} bytes; this host's KVM offers {ours} "
            "(KVM_CAP_XSAVE2): a state component is missing here"
        )
    return None


def capture(
    hosted: HostedVm, kvm: Kvm, timeline: Timeline | None = None, flat: bool = False
) -> list[tuple[str, bytes]]:
    """R6.3: every vCPU's and the VM's state; the vCPUs are parked. `flat`: the machine state in
    its flat form where the arch has one (the target offered FLAT_MACHINE_STATE)."""
    vm = hosted.vm
    assert vm is not None
    arch = arch_of(vm)
    if not faults.active("source-skip-its-save"):
        arch.prepare_state_save(vm)
    if flat and arch.flat_state_kind is not None:
        record = arch.save_flat_state(vm)
        if timeline is not None:
            timeline.mark("state_read")
        if faults.active("source-zero-xsave"):
            record = zero_flat_xsave(record)
        blobs = [(arch.flat_state_kind, record)]
    else:
        wire = arch.save_state(vm)
        if timeline is not None:
            timeline.mark("state_read")
        if faults.active("source-zero-xsave"):
            for vcpu in wire["vcpus"]:
                vcpu["xsave"] = bytes(len(vcpu["xsave"]))
        blobs = [(arch.state_kind, msgpack.packb(wire, use_bin_type=True))]
    if hosted.ports is not None:
        # The vCPUs are parked, and (vcpu.py) finished their last I/O instruction before they
        # parked, so no device access is half done.
        blobs.append((X86_PORTS, msgpack.packb(hosted.ports.bus.to_wire(), use_bin_type=True)))
    if timeline is not None:
        timeline.mark("state_packed")
    return blobs


def restore(hosted: HostedVm, kvm: Kvm, blobs: list[tuple[str, bytes]]) -> dict[str, float]:
    """R9, after all memory is in place. Returns the restore's seconds per step."""
    vm = hosted.vm
    assert vm is not None
    arch = arch_of(vm)
    machine = [arch.state_kind] + ([arch.flat_state_kind] if arch.flat_state_kind is not None else [])
    ports = [X86_PORTS] if hosted.ports is not None else []
    kinds = [kind for kind, _ in blobs]
    if len(kinds) != 1 + len(ports) or kinds[0] not in machine or kinds[1:] != ports:
        expected = " or ".join(repr([kind, *ports]) for kind in machine)
        raise ValueError(f"device state kinds {kinds}: this VM restores exactly {expected}")
    kind, blob = blobs[0]
    # The map form goes through msgpack; the flat form is a record of its own, checked by its arch.
    flat = kind != arch.state_kind
    wire = None if flat else _unpack(blob, "machine state")
    if flat:
        _bounded(blob, "machine state")
    if hosted.ports is not None:
        # Before any vCPU runs: the first `in` from the UART must see the source's registers.
        hosted.ports.bus.load_wire(_unpack(blobs[1][1], "port device state"))
    if flat:
        return arch.restore_flat_state(vm, blob).timings
    return arch.restore_state(vm, wire).timings


def rehearse_restore(hosted: HostedVm) -> float:
    """What `restore` runs for a flat machine state, up to its writes, on the VM's own state
    (arch `rehearse_flat_restore`), and the port devices' state through msgpack: a target, just
    before the source pauses, so that the restore in the downtime runs warm. Returns seconds."""
    vm = hosted.vm
    assert vm is not None
    arch = arch_of(vm)
    if arch.flat_state_kind is None:
        return 0.0
    seconds = arch.rehearse_flat_restore(vm)
    if hosted.ports is not None:
        started = time.perf_counter()
        _unpack(msgpack.packb(hosted.ports.bus.to_wire(), use_bin_type=True), "port device state")
        seconds += time.perf_counter() - started
    return seconds


def _bounded(blob: bytes, what: str) -> None:
    if len(blob) > _MAX_BLOB:
        raise ValueError(f"{what} of {len(blob)} bytes exceeds {_MAX_BLOB}")


def _unpack(blob: bytes, what: str) -> Any:
    _bounded(blob, what)
    try:
        return msgpack.unpackb(blob, raw=False, strict_map_key=True, max_bin_len=_MAX_BLOB)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise ValueError(f"{what} is not valid msgpack: {err}") from None


def estimate_ms(vcpus: int) -> float:
    """Save plus restore per vCPU (measured: 0.4-0.6 ms per vCPU each way, tests/kvm/test_x86_state.py);
    the rest of the fixed downtime cost is learned by the daemon's DowntimeModel."""
    return 1.0 * vcpus


def estimate_bytes(vcpus: int) -> int:
    return 16384 * vcpus
