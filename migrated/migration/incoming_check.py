"""The target's check of a source's VM description, before anything of the VM is allocated:
can this host run it (arch, vCPUs, memory layout, CPU features, overcommit), and are its settings
ones this daemon knows. Pure but for the questions it asks the daemon; the admission and the
name's reservation, which change the daemon, stay with the Target."""

from __future__ import annotations

from dataclasses import dataclass

from transport import VmDescription
from transport.datastream import MAX_STREAMS

from ..hosted import SpecError, VmSpec
from ..kvm.arch import host_arch
from ..kvm.backing import MEMORY_BACKINGS
from ..overcommit import OvercommitRefused
from . import vmstate
from .host import MigrationHost


class Refused(Exception):
    """This daemon cannot host the described VM; the reason goes back to the source."""


@dataclass(frozen=True)
class CheckedDescription:
    spec: VmSpec
    memory_backing: str | None  # None: this daemon's default
    run_state: str  # "running" or "paused": as the VM is to be after the cutover
    streams: int  # data streams the source opens beside the control connection
    # x86: the CPUID table of the source's vCPUs, which the VM is built with (VmConfig.cpuid);
    # () from an older source: the restore sets the state's, in the downtime.
    cpuid: tuple[bytes, ...] = ()
    # The RAM the source's file holds (st_blocks): which kept file of this daemon's RAM reserve
    # fits the VM (kvm/ramreserve.py); None from an older source.
    allocated_bytes: int | None = None


def check_description(description: VmDescription, daemon: MigrationHost) -> CheckedDescription:
    caps = daemon.kvm.caps()
    if not isinstance(description.cpu_features, dict):
        raise Refused("VM description: cpu_features must be a map")
    features = description.cpu_features
    spec_wire = features.get("spec")
    if not isinstance(spec_wire, dict):
        raise Refused("VM description: cpu_features has no VM spec map")
    try:
        spec = VmSpec.from_wire(dict(spec_wire))
    except SpecError as err:
        raise Refused(f"VM description: {err}") from None
    if spec.name != description.name:
        raise Refused(f"VM description names {description.name!r} but its spec {spec.name!r}")
    if description.arch != caps.arch:
        raise Refused(f"VM is {description.arch}; this host is {caps.arch}")
    if description.vcpus != spec.vcpus or description.vcpus > caps.max_vcpus:
        raise Refused(f"{description.vcpus} vCPUs: this host allows 1 to {caps.max_vcpus}")
    layout = [(r.slot, r.guest_phys_addr, r.size) for r in description.memory]
    ram_base = host_arch(caps.arch).ram_base
    if layout != [(0, ram_base, spec.memory_bytes)]:
        raise Refused(f"memory layout {layout}: this daemon hosts one slot at {ram_base:#x} of the spec's size")
    try:
        daemon.check_overcommit(spec)
    except OvercommitRefused as err:
        raise Refused(str(err)) from None
    problem = vmstate.incompatibility(dict(features), daemon.kvm)
    if problem:
        raise Refused(problem)
    backing = features.get("memory_backing")
    if backing is not None and backing not in MEMORY_BACKINGS:
        raise Refused(f"memory_backing {backing!r}: allowed are {', '.join(MEMORY_BACKINGS)}")
    run_state = features.get("run_state", "running")
    if run_state not in ("running", "paused"):
        raise Refused(f"run_state {run_state!r}: allowed are running, paused")
    data_streams = features.get("data_streams", 0)
    if isinstance(data_streams, bool) or not isinstance(data_streams, int) or not 0 <= data_streams <= MAX_STREAMS:
        raise Refused(f"data_streams {data_streams!r}: allowed are 0 to {MAX_STREAMS}")
    # Bounded and checked entry by entry by the transport (VmDescription); whether KVM takes it
    # shows when the vCPUs are built, a refusal all the same (`Target._build_and_register`).
    cpuid = features.get("vcpu_cpuid") or ()
    allocated = features.get("allocated_bytes")
    if allocated is not None and (
        isinstance(allocated, bool) or not isinstance(allocated, int) or not 0 <= allocated <= spec.memory_bytes
    ):
        raise Refused(f"allocated_bytes {allocated!r}: allowed are 0 to the VM's memory ({spec.memory_bytes} bytes)")
    return CheckedDescription(spec, backing, run_state, data_streams, tuple(cpuid), allocated)
