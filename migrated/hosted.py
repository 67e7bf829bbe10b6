"""The VMs a daemon hosts: what each was created from (VmSpec) and what it is now (HostedVm).

A HostedVm owns one `Vm` and, for the workload guest, the view that reads its status pages. Its
state says who may run it: only a "running" or "paused" VM belongs to this daemon alone; the
migration states say where the VM is on its way (DESIGN section 5).
"""

from __future__ import annotations

import enum
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from .devices import ConsoleLog, PcPorts, pc_ports
from .guests.x86_64.raw import DEFAULT_LOAD_ADDR, check_raw_image, describe_entry, load_raw, read_raw_image
from .guests.workload import WorkloadParams
from .guests.workload_kinds import workload_kind
from .kvm.backing import RamBacking
from .kvm.system import Kvm
from .kvm.memory import GuestMemory
from .kvm.vcpu import Vcpu
from .kvm.arch import create_vm, host_arch
from .kvm.vm import DIRTY_TRACKING_MODES, DirtyTrackingMode, Vm, VmConfig
from .logs import get_logger

log = get_logger(component="vm")

MIB = 1 << 20
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# "smallos": the workload under a small CPL0 kernel with interrupts, timers and register checks
# (x86; the VM gets the in-kernel irqchip and PIT).
GUEST_KINDS = ("workload", "smallos", "raw", "none")
WORKLOADS = ("workload", "smallos")
MAX_MEMORY_MIB = 1 << 20  # 1 TiB: sparse memfd RAM makes large guests cheap until touched
MAX_VCPUS = 64
HOST_WORKLOAD = workload_kind(host_arch().name)  # the workload guest this host runs


class SpecError(ValueError):
    """A VM description that names what is wrong and what is allowed."""


@dataclass(frozen=True)
class VmSpec:
    """What a VM is created from; travels to the target in the migration's VM description."""

    name: str
    memory_mib: int
    vcpus: int = 1
    guest: str = "workload"
    dirty_rate_mib_s: float = 0.0  # math.inf = as fast as the guest can
    working_set_mib: int = 16
    seed: int = 0
    # guest "raw": the image file on the host that created the VM (a target never reads it: the
    # image arrives in RAM), where it is loaded and how it starts (migrated.guests.x86_64.raw).
    image: str = ""
    load_addr: int = DEFAULT_LOAD_ADDR
    entry: str = "real"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise SpecError(
                f"VM name {self.name!r}: 1-64 characters of letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        _int_in("memory (MiB)", self.memory_mib, 2, MAX_MEMORY_MIB)
        if self.memory_mib % 2:
            raise SpecError(f"memory {self.memory_mib} MiB: must be a multiple of 2 MiB")
        _int_in("vCPUs", self.vcpus, 1, MAX_VCPUS)
        if self.guest not in GUEST_KINDS:
            raise SpecError(f"guest {self.guest!r}: allowed are {', '.join(GUEST_KINDS)}")
        rate = self.dirty_rate_mib_s
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) or rate < 0:
            raise SpecError(f"dirty rate {rate!r} MiB/s: a number >= 0, or 'max'")
        _int_in("working set (MiB)", self.working_set_mib, 1, self.memory_mib)
        _int_in("seed", self.seed, 0, (1 << 64) - 1)
        if self.guest == "raw":
            if not isinstance(self.image, str) or not self.image.startswith("/"):
                raise SpecError(f"VM {self.name}: a raw guest needs its image as an absolute path")
            _int_in("load address", self.load_addr, 0, self.memory_bytes - 1)
            try:
                # The image's size is unknown here (a target never sees the file): the rest.
                check_raw_image(1, self.memory_bytes, self.load_addr, self.entry, vcpus=self.vcpus)
            except ValueError as err:
                raise SpecError(f"VM {self.name}: {err}") from None
        elif self.image:
            raise SpecError(f"VM {self.name}: an image is for guest 'raw' only")
        if self.guest == "smallos" and not HOST_WORKLOAD.runs_smallos:
            raise SpecError(f"VM {self.name}: guest 'smallos' runs on x86_64 hosts only")
        if self.guest in WORKLOADS:
            try:
                self.workload_params()
                self.plan_layout()
            except ValueError as err:
                raise SpecError(f"VM {self.name}: {err}") from None

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    def plan_layout(self) -> Any:
        """Where the workload guest puts everything, for this host's architecture."""
        return HOST_WORKLOAD.plan(self.memory_bytes, self.vcpus, self.working_set_mib * MIB, self.guest == "smallos")

    def view(self) -> Any:
        """The VMM's view of the workload guest (status pages, checks), from its layout."""
        return HOST_WORKLOAD.view(self.plan_layout())

    def workload_params(self) -> WorkloadParams:
        return WorkloadParams(
            vcpus=self.vcpus,
            working_set_bytes=self.working_set_mib * MIB,
            dirty_rate_mib_s=self.dirty_rate_mib_s,
            seed=self.seed,
            smallos=self.guest == "smallos",
        )

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["dirty_rate_mib_s"] = "max" if math.isinf(self.dirty_rate_mib_s) else self.dirty_rate_mib_s
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> VmSpec:
        if not isinstance(wire, dict):
            raise SpecError(f"VM spec must be a map, got {type(wire).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(wire) - known
        if unknown:
            raise SpecError(f"VM spec has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        values = dict(wire)
        if values.get("dirty_rate_mib_s") == "max":
            values["dirty_rate_mib_s"] = math.inf
        try:
            return cls(**values)
        except TypeError as err:
            raise SpecError(f"VM spec: {err}") from None


def _int_in(what: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{what} {value!r}: an integer from {low} to {high}")


class VmState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"  # by the operator
    MIGRATING = "migrating"  # source side, before the VM belongs to the target
    IN_DOUBT = "in-doubt"  # source: COMMIT sent, RUNNING never came; paused until resolved
    MIGRATED = "migrated"  # source: the target runs it; this copy is released
    INCOMING = "incoming"  # target: being loaded; never runs without COMMIT
    FAILED = "failed"  # a vCPU stopped for an error; the VM is kept for inspection
    STOPPED = "stopped"


class HostedVm:
    def __init__(self, spec: VmSpec, vm: Vm, guest: Any, state: VmState, ports: PcPorts | None = None) -> None:
        self.spec = spec
        self.vm: Vm | None = vm
        self.guest = guest
        self.ports = ports  # raw guests: COM1, port 0x92, the floating legacy ports
        self.console_log: ConsoleLog | None = None  # raw guests: the per-VM log of COM1
        self.warnings: list[str] = []  # the loader's, for the daemon to log
        self.state = state
        self.error: str | None = None
        self.created_at = time.time()
        self.last_migration: dict[str, Any] | None = None
        self.stopped_at: float | None = None  # when it stopped unexpectedly
        vm.on_vcpu_finished = self._vcpu_finished
        # A vCPU that failed before the callback was in place (at its first KVM_RUN) still counts.
        for vcpu in vm.vcpus:
            if vcpu.error is not None:
                self._vcpu_finished(vcpu)

    @property
    def name(self) -> str:
        return self.spec.name

    def _vcpu_finished(self, vcpu: Vcpu) -> None:
        # Called on the vCPU's thread. A vCPU thread ends on request (pause, stop) without an
        # error; any other end is the VM stopping unexpectedly: one event, and `vm show` says why.
        if vcpu.error is not None and self.error is None:
            self.error = f"vCPU {vcpu.index}: {vcpu.error}"
            self.stopped_at = time.time()
            self.state = VmState.FAILED
            log.error("vm_stopped_unexpectedly", vm=self.name, vcpu=vcpu.index, reason=str(vcpu.error))

    def has_run(self) -> bool:
        """The guest got going: a workload guest's first heartbeat; any other guest's first exit
        (a raw guest in a tight loop may make none: the caller bounds the wait)."""
        vm = self.vm
        if vm is None:
            return False
        if self.guest is not None and vm.memory is not None:
            return any(s.heartbeat > 0 for s in self.guest.status(vm.ram))
        return any(v.served_exits > 0 for v in vm.vcpus)

    def show(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "state": self.state.value,
            "spec": self.spec.to_wire(),
            "error": self.error,
            "stopped_at": self.stopped_at,
        }
        vm = self.vm
        if vm is not None and vm.memory is not None:
            info["memory_backing"] = vm.memory.backing.kind
            info["ram_from_reserve"] = vm.memory.from_reserve  # the zeroed file of a VM that left (ramreserve.py)
            # What the RAM file holds now: for hugetlbfs all of it, from the start.
            info["memory_allocated_bytes"] = vm.memory.allocated_bytes()
        if vm is not None and vm.tracker is not None:
            stats = vm.tracker.stats
            info["dirty_tracking"] = vm.dirty_tracking
            info["tracker"] = {
                "collections": stats.collections,
                "polls": stats.polls,
                "entries_harvested": stats.entries_harvested,
                "ring_full_exits": stats.ring_full_exits,
                "backup_bitmap": stats.backup_bitmap,
                # SCHED_FIFO for the ring harvester (vm.py); False: refused, runs as a normal thread
                "harvester_realtime": vm.harvester_realtime,
            }
            info["vcpus"] = [asdict(v.stats()) for v in vm.vcpus]
            # The share of each throttle period each vCPU is held out of KVM_RUN (0: runs free).
            info["vcpu_throttle_percent"] = [round(share * 100, 1) for share in vm.vcpu_throttle_shares]
        if vm is not None and self.guest is not None and vm.memory is not None:
            status = self.guest.status(vm.ram)
            info["guest"] = {
                "heartbeat": [s.heartbeat for s in status],
                "heartbeat_generation": sum(s.heartbeat for s in status),
                "pages_written": sum(s.pages_written for s in status),
                "pages_written_per_vcpu": [s.pages_written for s in status],
                "verification_errors": sum(s.verify_errors for s in status),
                "passes_done": [s.passes_done for s in status],
            }
            kernels = [s.smallos for s in status if getattr(s, "smallos", None) is not None]
            if kernels:
                errors: dict[str, int] = {}
                for kernel in kernels:
                    for key, value in kernel.errors.items():
                        errors[key] = errors.get(key, 0) + value
                info["guest"]["smallos"] = {
                    "ticks": [k.ticks for k in kernels],
                    "ipis": [k.ipis for k in kernels],
                    "irqs": sum(k.irqs for k in kernels),
                    "pit_ticks": sum(k.pit_ticks for k in kernels),
                    "reg_checks": sum(k.reg_checks for k in kernels),
                    "reg_mismatches": sum(k.reg_mismatches for k in kernels),
                    "clock_regressions": sum(k.clock_regressions for k in kernels),
                    "msr_mismatches": sum(k.msr_mismatches for k in kernels),
                    "atomic_violations": sum(k.atomic_violations for k in kernels),
                    "errors": errors,
                }
            if status and hasattr(status[0], "lpis_expected"):  # the arm64 guest counts its LPIs
                info["guest"]["lpis_expected"] = sum(s.lpis_expected for s in status)
                info["guest"]["lpis_received"] = sum(s.lpis_received for s in status)
        if self.ports is not None:
            bus = self.ports.bus.stats()
            info["raw"] = {
                "image": self.spec.image,
                **describe_entry(self.spec.load_addr, self.spec.entry),
                "uart": bus["devices"]["com1"],
                "port92": bus["devices"]["port92"],
                "other_ports": bus["devices"]["unclaimed"],
                "io_exits": bus["exits"],
            }
        if self.last_migration is not None:
            info["last_migration"] = self.last_migration
        return info

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.console_log is not None:
            self.console_log.close()  # after the vCPUs: nothing writes to it any more
            self.console_log = None


def vm_config(
    spec: VmSpec,
    dirty_tracking: str,
    ring_bytes: int,
    harvest_interval_ms: float,
    memory_backing: RamBacking | None = None,
) -> VmConfig:
    if dirty_tracking not in DIRTY_TRACKING_MODES:
        raise SpecError(f"dirty tracking {dirty_tracking!r}: allowed are {DIRTY_TRACKING_MODES}")
    return VmConfig(
        memory_bytes=spec.memory_bytes,
        vcpus=spec.vcpus,
        dirty_tracking=cast(DirtyTrackingMode, dirty_tracking),
        ring_bytes=ring_bytes,
        harvest_interval_s=harvest_interval_ms / 1e3,
        name=spec.name,
        irqchip=spec.guest == "smallos",
        pit=spec.guest == "smallos",
        memory_backing=memory_backing if memory_backing is not None else RamBacking(),
    )


def raw_ports(vm: Vm, console_log: Path | None) -> tuple[PcPorts, ConsoleLog | None]:
    """A raw guest's port devices, serving vCPU 0's port I/O exits; COM1 also to the log."""
    log = ConsoleLog(console_log) if console_log is not None else None
    ports = pc_ports(console_sink=log.write if log is not None else None)
    ports.bus.attach(vm.vcpus[0])
    return ports, log


def create_local(kvm: Kvm, spec: VmSpec, config: VmConfig, console_log: Path | None = None) -> HostedVm:
    """A new VM with its guest loaded and running (blocking: call it off the event loop).
    `console_log`: the file a raw guest's UART output is appended to."""
    image = read_raw_image(spec.image, spec.memory_bytes) if spec.guest == "raw" else b""
    vm = create_vm(kvm, config)
    ports: PcPorts | None = None
    log: ConsoleLog | None = None
    warnings: list[str] = []
    try:
        guest: Any = None
        if spec.guest == "raw":
            ports, log = raw_ports(vm, console_log)
            warnings = load_raw(vm, image, spec.load_addr, spec.entry)
        if spec.guest in WORKLOADS:
            guest = workload_kind(vm.arch.name).load(vm, spec.workload_params())
        vm.start()
    except BaseException:
        vm.close()
        if log is not None:
            log.close()
        raise
    hosted = HostedVm(spec, vm, guest, VmState.RUNNING, ports)
    hosted.console_log, hosted.warnings = log, warnings
    return hosted


def create_incoming(
    kvm: Kvm,
    spec: VmSpec,
    config: VmConfig,
    console_log: Path | None = None,
    start: bool = True,
    memory: GuestMemory | None = None,
    shell: Vm | None = None,
) -> HostedVm:
    """The target's empty copy: same layout, created under R1/R2, vCPUs parked, never running.
    A raw guest gets the same devices, empty: their state comes with the vCPUs' (vmstate).
    `start=False`: the vCPU threads (parked) and the harvester are started later by the
    caller (`hosted.vm.start(running=False)`), before anything loads or resumes the VM.
    `memory`: its RAM, made beforehand (`kvm.arch.guest_memory`): the VM's once built, the
    caller's still if this fails. `shell`: an empty VM made ahead for this config's kind
    (vmshell.py), the VM's from here on."""
    vm = create_vm(kvm, config, memory, shell)
    ports: PcPorts | None = None
    log: ConsoleLog | None = None
    try:
        guest = spec.view() if spec.guest in WORKLOADS else None
        if spec.guest == "raw":
            ports, log = raw_ports(vm, console_log)
        if start:
            vm.start(running=False)
    except BaseException:
        if memory is not None:
            vm.memory = None  # still the caller's (see Vm.create)
        vm.close()
        if log is not None:
            log.close()
        raise
    hosted = HostedVm(spec, vm, guest, VmState.INCOMING, ports)
    hosted.console_log = log
    return hosted
