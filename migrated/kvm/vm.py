"""A KVM virtual machine owned by this process: its fd, RAM, memslots, vCPUs and dirty tracking.

`Vm.create()` builds a VM in the one order the kernel's rules allow (DESIGN R1, R2): the dirty
ring right after KVM_CREATE_VM, WITH_BITMAP (where offered) next, then memslots, then vCPUs. The
single steps are public so that the order can be tested, and each one refuses, before the kernel
sees the request, to run out of order. What differs by architecture (where RAM starts, devices
created before the vCPUs, per-vCPU setup, the interrupt controller once every vCPU exists) comes
from a `VmArch` object (`migrated/kvm/arch/`), which this module never imports. It knows nothing
about migration.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from . import uapi
from ._libc import MAP_SHARED, PROT_READ, PROT_WRITE, ioctl, mmap, munmap
from .backing import RamBacking
from .dirty import BitmapTracker, DirtyTracker, RingTracker
from .errors import (
    DirtyTrackingOrderError,
    KvmCapabilityError,
    KvmIoctlError,
    VcpuError,
    VmConfigError,
)
from .memory import PAGE_SIZE, GuestMemory
from .system import HostCaps, Kvm
from .threadnames import kernel_name, name_this_thread
from .vcpu import Vcpu, VcpuRunState, ensure_kick_handler

DirtyTrackingMode = Literal["auto", "ring", "bitmap"]
DIRTY_TRACKING_MODES: tuple[str, ...] = ("auto", "ring", "bitmap")
DEFAULT_RING_BYTES = 1 << 20
MIN_RING_BYTES = PAGE_SIZE  # the kernel wants at least a page (and its reserved entries)
HARVEST_INTERVAL_S = 0.001  # HOST-NOTES: every 1 ms kept rings from filling at ~460k pages/s


@dataclass(frozen=True)
class VmConfig:
    memory_bytes: int
    vcpus: int = 1
    dirty_tracking: DirtyTrackingMode = "auto"
    ring_bytes: int = DEFAULT_RING_BYTES
    harvest_interval_s: float = HARVEST_INTERVAL_S
    name: str = "vm"
    # x86: the in-kernel irqchip (PIC, IOAPIC, a LAPIC per vCPU) and PIT; created before the
    # vCPUs, which KVM requires for KVM_CREATE_IRQCHIP.
    irqchip: bool = False
    pit: bool = False
    memory_backing: RamBacking = RamBacking()
    # x86: the CPUID table every vCPU gets (raw struct kvm_cpuid_entry2 each); empty: the host's
    # supported CPUID. A target builds with the source's, so its restore need not set it again.
    cpuid: tuple[bytes, ...] = ()


class VmArch(Protocol):
    """The steps of building a VM that differ by architecture (implemented in kvm/arch/)."""

    name: str  # as uname -m says it: "x86_64", "aarch64"
    ram_base: int  # guest-physical address where RAM starts

    def check_config(self, config: VmConfig, caps: HostCaps, tracking: str) -> None: ...

    def guest_memory(self, size: int, name: str, backing: RamBacking | None = None) -> GuestMemory: ...

    def before_vcpus(self, vm: Vm, config: VmConfig) -> None:
        """In-kernel devices that must exist before the first vCPU."""
        ...

    def before_vcpus_of(self, vm: Vm, config: VmConfig) -> None:
        """What the vCPUs of this VM's description need (`complete`), on a VM that may have been
        made ahead of its description (a warm shell: `before_vcpus` ran then)."""
        ...

    def setup_vcpu(self, vm: Vm, vcpu: Vcpu) -> None: ...

    def after_vcpus(self, vm: Vm) -> None:
        """What needs every vCPU to exist first."""
        ...


class ArchDevices(Protocol):
    """The in-kernel devices an architecture adds to a VM (device fds), closed with it."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class ShellKind:
    """What a VM is before its first memslot and vCPU (`Vm.create_empty`): two configs of one
    kind build the same empty VM, so a shell made for one serves the other."""

    tracking: str  # "ring" or "bitmap", resolved from "auto"
    ring_bytes: int  # 0 in bitmap mode
    irqchip: bool
    pit: bool

    def __str__(self) -> str:
        ring = f" of {self.ring_bytes} bytes" if self.ring_bytes else ""
        devices = "".join(f", {name}" for name, has in (("irqchip", self.irqchip), ("PIT", self.pit)) if has)
        return f"({self.tracking}{ring}{devices})"


def shell_kind(config: VmConfig, caps: HostCaps, arch: VmArch) -> ShellKind:
    """The kind of empty VM `config` starts from; raises what `validate_config` raises."""
    mode = validate_config(config, caps, arch)
    return ShellKind(mode, config.ring_bytes if mode == "ring" else 0, config.irqchip, config.pit)


def validate_config(config: VmConfig, caps: HostCaps, arch: VmArch) -> str:
    """Check `config` against this host; returns the tracking mode to use ("ring" or "bitmap")."""
    if config.memory_bytes <= 0 or config.memory_bytes % (2 << 20):
        raise VmConfigError(f"memory {config.memory_bytes} bytes: must be a positive multiple of 2 MiB")
    if not 1 <= config.vcpus <= caps.max_vcpus:
        raise VmConfigError(
            f"{config.vcpus} vCPUs requested: this host allows 1 to {caps.max_vcpus} "
            f"(KVM_CAP_MAX_VCPUS; {caps.recommended_vcpus} recommended)"
        )
    if config.dirty_tracking not in DIRTY_TRACKING_MODES:
        raise VmConfigError(f"dirty tracking {config.dirty_tracking!r}: allowed are {', '.join(DIRTY_TRACKING_MODES)}")
    mode = config.dirty_tracking
    if mode == "auto":
        mode = "ring" if caps.dirty_ring_max_bytes else "bitmap"
    if mode == "ring":
        if not caps.dirty_ring_max_bytes:
            raise KvmCapabilityError(
                "dirty tracking 'ring' requested, but this host's KVM offers no dirty ring "
                "(KVM_CAP_DIRTY_LOG_RING_ACQ_REL and KVM_CAP_DIRTY_LOG_RING are 0); use 'bitmap'"
            )
        validate_ring_bytes(config.ring_bytes, caps)
    arch.check_config(config, caps, mode)
    return mode


def validate_ring_bytes(ring_bytes: int, caps: HostCaps) -> None:
    limit = caps.dirty_ring_max_bytes
    if ring_bytes <= 0 or ring_bytes & (ring_bytes - 1):
        raise VmConfigError(
            f"dirty ring size {ring_bytes} bytes: must be a power of two between {MIN_RING_BYTES} and {limit} bytes"
        )
    if not MIN_RING_BYTES <= ring_bytes <= limit:
        raise VmConfigError(
            f"dirty ring size {ring_bytes} bytes: this host allows powers of two from "
            f"{MIN_RING_BYTES} to {limit} bytes (KVM_CAP_DIRTY_LOG_RING_ACQ_REL)"
        )


class Vm:
    """A VM and everything it owns. Close it with `close()` (or `with`)."""

    def __init__(self, kvm: Kvm, caps: HostCaps, arch: VmArch, name: str = "vm") -> None:
        self.kvm = kvm
        self.arch = arch
        self.caps = caps
        self.name = name
        self.fd = kvm.create_vm_fd()
        self.memory: GuestMemory | None = None
        self.vcpus: list[Vcpu] = []
        self.memslots: list[uapi.kvm_userspace_memory_region] = []
        self.ring_bytes = 0
        self.ring_acq_rel = False
        self.with_bitmap = False
        self.manual_protect = False
        self.tracker: DirtyTracker | None = None
        self._vcpu_maps: list[tuple[int, int]] = []
        self._harvester: threading.Thread | None = None
        self._harvest_stop = threading.Event()
        self._harvest_interval_s = HARVEST_INTERVAL_S
        self.harvester_error: BaseException | None = None
        self._throttle_thread: threading.Thread | None = None
        self._throttle_stop = threading.Event()
        self._throttle_shares: tuple[float, ...] = ()
        self.harvester_realtime: bool | None = None  # SCHED_FIFO granted (None: not started)
        self.on_vcpu_finished: Callable[[Vcpu], None] | None = None
        # arm64 only: the vCPU init and the vGIC/ITS device fds (aarch64.setup_machine).
        self.arm: ArchDevices | None = None
        self.kind: ShellKind | None = None  # what `create_empty` made it for (vmshell.py)

    # ---- the one order (R1, R2), composed -----------------------------------------------

    @classmethod
    def create(
        cls, kvm: Kvm, config: VmConfig, arch: VmArch, memory: GuestMemory | None = None, shell: Vm | None = None
    ) -> Vm:
        """The whole build; `migrated.kvm.arch.create_vm` passes this host's architecture.

        `memory`: guest RAM made beforehand by `arch.guest_memory` for this config (a target
        receives pages into it while the VM is built). The VM owns it once built; a build that
        fails leaves it to the caller, whose threads may still be writing into it.
        `shell`: a VM made ahead by `create_empty` for a config of the same `shell_kind`
        (vmshell.py): the build goes on from there, and the shell is this VM's (closed with it
        if the build fails)."""
        if shell is None:
            vm = cls.create_empty(kvm, config, arch)
        else:
            vm, wanted = shell, shell_kind(config, shell.caps, arch)
            if vm.kind != wanted or vm.fd < 0 or vm.memslots or vm.vcpus:
                vm.close()
                raise VmConfigError(f"the VM shell {vm.kind} is used or does not fit a VM of kind {wanted}")
        vm.complete(config, memory)
        return vm

    @classmethod
    def create_empty(cls, kvm: Kvm, config: VmConfig, arch: VmArch) -> Vm:
        """The steps that come before any memslot and vCPU, and depend on none of the VM's
        description but its `shell_kind`: KVM_CREATE_VM, the dirty ring (R1), WITH_BITMAP (R2)
        or bitmap mode's manual protect, the in-kernel devices made before the vCPUs. `complete`
        adds the rest; a warm shell (vmshell.py) is one of these made ahead of its VM."""
        caps = kvm.caps()
        mode = validate_config(config, caps, arch)
        ensure_kick_handler()
        vm = cls(kvm, caps, arch, config.name)
        try:
            if mode == "ring":
                # api.rst (8.29): "Userspace should call KVM_ENABLE_CAP ioctl right after
                # KVM_CREATE_VM ioctl to enable this capability [...] Enabling the capability is
                # only allowed before creating any vCPU".
                vm.enable_dirty_ring(config.ring_bytes)  # R1
                if caps.dirty_ring_with_bitmap:
                    # api.rst: "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP can't be enabled if the
                    # capability of KVM_CAP_DIRTY_LOG_RING_ACQ_REL hasn't been enabled, or any
                    # memslot has been existing."
                    vm.enable_ring_with_bitmap()  # R2
            elif caps.manual_dirty_log_protect:
                vm.enable_manual_dirty_log_protect()
            # x86: KVM_CREATE_IRQCHIP "sets up future vcpus to have a local APIC" (api.rst), so
            # before the vCPUs; it needs no memslot.
            arch.before_vcpus(vm, config)
        except BaseException:
            vm.close()
            raise
        vm.kind = shell_kind(config, caps, arch)
        return vm

    def complete(self, config: VmConfig, memory: GuestMemory | None = None) -> None:
        """The rest of the build on a VM from `create_empty`: the memslots, the vCPUs, the
        tracker. A failure closes the VM (not `memory`, which stays the caller's)."""
        arch = self.arch
        self.name = config.name
        self._harvest_interval_s = config.harvest_interval_s
        given = memory is not None
        try:
            if memory is not None and memory.size != config.memory_bytes:
                raise VmConfigError(
                    f"guest memory of {memory.size} bytes given for a VM of {config.memory_bytes} bytes"
                )
            if memory is None:
                memory = arch.guest_memory(config.memory_bytes, f"{config.name}-ram", config.memory_backing)
            self.add_memory(memory)
            arch.before_vcpus_of(self, config)
            for index in range(config.vcpus):
                self.create_vcpu(index)
            arch.after_vcpus(self)
            self.finish_setup()
        except BaseException:
            if given:
                self.memory = None  # the caller's: its memslots die with the VM fd, the RAM stays
            self.close()
            raise

    # ---- single steps -------------------------------------------------------------------

    def ioctl(self, step: str, request: int, arg: Any = 0) -> int:
        """A VM ioctl; a failure raises KvmIoctlError naming `step`."""
        try:
            return ioctl(self.fd, request, arg)
        except OSError as err:
            raise KvmIoctlError(step, err) from err

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set a GSI of the in-kernel irqchip to `level`."""
        self.ioctl(
            f"KVM_IRQ_LINE (irq {irq}, level {level})", uapi.KVM_IRQ_LINE, uapi.kvm_irq_level(irq=irq, level=level)
        )

    def _enable_cap(self, step: str, cap: int, *args: int) -> None:
        request = uapi.kvm_enable_cap(cap=cap)
        for i, value in enumerate(args):
            request.args[i] = value
        self.ioctl(step, uapi.KVM_ENABLE_CAP, request)

    def _existing(self) -> str:
        return f"this VM has {len(self.vcpus)} vCPU(s) and {len(self.memslots)} memslot(s)"

    def enable_dirty_ring(self, ring_bytes: int) -> None:
        """R1: the ring, right after KVM_CREATE_VM, before any vCPU and any memslot."""
        if self.vcpus or self.memslots:
            raise DirtyTrackingOrderError(
                "R1: the dirty ring must be enabled right after KVM_CREATE_VM, before any vCPU "
                f"or memslot exists; {self._existing()}"
            )
        if self.ring_bytes:
            raise DirtyTrackingOrderError("R1: the dirty ring is already enabled on this VM")
        validate_ring_bytes(ring_bytes, self.caps)
        cap = uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL if self.caps.dirty_ring_acq_rel else uapi.KVM_CAP_DIRTY_LOG_RING
        self._enable_cap(f"KVM_ENABLE_CAP(dirty ring, {ring_bytes} bytes)", cap, ring_bytes)
        self.ring_bytes = ring_bytes
        self.ring_acq_rel = self.caps.dirty_ring_acq_rel

    def enable_ring_with_bitmap(self) -> None:
        """R2: WITH_BITMAP after the ring and before the first memslot.

        A memslot created earlier would have no bitmap, and the kernel would dereference NULL on
        the first write made without a vCPU (the seed's review). A refusal by the kernel is a
        configuration error, not retried.
        """
        if not self.ring_bytes:
            raise DirtyTrackingOrderError(
                "R2: KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP can only be enabled after the dirty ring"
            )
        if self.memslots:
            raise DirtyTrackingOrderError(
                f"R2: KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP must be enabled before the first memslot; {self._existing()}"
            )
        if self.with_bitmap:
            return
        self._enable_cap(
            "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)",
            uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
        )
        self.with_bitmap = True

    def enable_manual_dirty_log_protect(self) -> None:
        """Bitmap mode only (R4b: never with the ring), and without INITIALLY_SET."""
        if self.ring_bytes:
            raise DirtyTrackingOrderError(
                "R4b: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is never combined with the dirty ring"
            )
        self._enable_cap(
            "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)",
            uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
        )
        self.manual_protect = True

    def add_memory(self, memory: GuestMemory) -> None:
        """Register guest RAM: one memslot per region, dirty logging on from the start."""
        if self.memory is not None:
            raise VmConfigError("this VM already has its guest memory")
        if len(memory.regions) > self.caps.memslots:
            raise VmConfigError(f"{len(memory.regions)} memory regions: this host allows {self.caps.memslots}")
        self.memory = memory
        for region in memory.regions:
            slot = uapi.kvm_userspace_memory_region(
                slot=region.slot,
                flags=uapi.KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr=region.guest_phys_addr,
                memory_size=region.size,
                userspace_addr=memory.host_address(region),
            )
            self.ioctl(f"KVM_SET_USER_MEMORY_REGION (slot {region.slot})", uapi.KVM_SET_USER_MEMORY_REGION, slot)
            self.memslots.append(slot)

    def create_vcpu(self, index: int) -> Vcpu:
        if index != len(self.vcpus):
            raise VmConfigError(f"vCPU {index} created out of order; next is {len(self.vcpus)}")
        fd = self.ioctl(f"KVM_CREATE_VCPU {index}", uapi.KVM_CREATE_VCPU, index)
        maps: list[tuple[int, int]] = []
        try:
            run_size = self.caps.vcpu_mmap_bytes
            run_address = mmap(run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            maps.append((run_address, run_size))
            ring_address = None
            if self.ring_bytes:
                # api.rst: the ring is mmapped from the vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET
                # pages, read-write when ACQ_REL is in use (userspace stores the RESET flag).
                ring_address = mmap(
                    self.ring_bytes,
                    PROT_READ | PROT_WRITE,
                    MAP_SHARED,
                    fd,
                    uapi.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE,
                )
                maps.append((ring_address, self.ring_bytes))
        except BaseException:
            for address, size in maps:
                munmap(address, size)
            os.close(fd)
            raise
        vcpu = Vcpu(index, fd, run_address, ring_address)
        vcpu.kernel_name = kernel_name(self.name, f"vcpu{index}")
        self.vcpus.append(vcpu)
        self._vcpu_maps.extend(maps)
        self.arch.setup_vcpu(self, vcpu)
        return vcpu

    def finish_setup(self) -> None:
        """Create the dirty tracker once memory and vCPUs exist, and wire the vCPU exits."""
        if self.memory is None:
            raise VmConfigError("a VM needs guest memory before its tracker")
        tracker: DirtyTracker
        if self.ring_bytes:
            if self.with_bitmap:
                reason = "used: KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP enabled (R6.4)"
            else:
                reason = (
                    "not in use: this kernel does not advertise "
                    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, so KVM_GET_DIRTY_LOG would fail with "
                    "ENXIO and the rings hold all dirty state (R7)"
                )
            ring = RingTracker(self.fd, self.memory, self.ring_bytes // 16, self.with_bitmap, reason)
            for vcpu in self.vcpus:
                assert vcpu.ring_address is not None
                ring.add_ring(
                    vcpu.index,
                    memoryview((ctypes.c_uint8 * self.ring_bytes).from_address(vcpu.ring_address)),
                )
                vcpu.handlers[uapi.KVM_EXIT_DIRTY_RING_FULL] = self._ring_full_handler(ring)
            tracker = ring
        else:
            tracker = BitmapTracker(self.fd, self.memory, self.manual_protect)
        self.tracker = tracker
        for vcpu in self.vcpus:
            vcpu.on_finished = self._vcpu_finished

    @staticmethod
    def _ring_full_handler(ring: RingTracker) -> Callable[[Vcpu], None]:
        def handle(vcpu: Vcpu) -> None:
            ring.on_ring_full(vcpu.index)

        return handle

    def _vcpu_finished(self, vcpu: Vcpu) -> None:
        if self.on_vcpu_finished is not None:
            self.on_vcpu_finished(vcpu)

    # ---- running ------------------------------------------------------------------------

    @property
    def dirty_tracking(self) -> str:
        return "ring" if self.ring_bytes else "bitmap"

    @property
    def ram(self) -> Any:
        """All guest RAM as one numpy uint8 array (guest-physical 0 at index 0)."""
        assert self.memory is not None
        return self.memory.bytes

    def write_guest(self, gpa: int, data: Any) -> None:
        """Write guest RAM as the daemon; the pages are marked dirty (R5)."""
        assert self.memory is not None
        self.memory.write(gpa, data)

    def tsc_khz(self) -> int:
        return self.vcpus[0].tsc_khz()

    def start(self, running: bool = True) -> None:
        """Start the vCPU threads and, in ring mode, the continuous harvester (R4)."""
        if self.ring_bytes and self._harvester is None:
            self._harvester = threading.Thread(target=self._harvest_loop, name=f"{self.name}-harvest", daemon=True)
            self._harvester.start()
        for vcpu in self.vcpus:
            vcpu.start(running=running)

    def _harvest_loop(self) -> None:
        name_this_thread(kernel_name(self.name, "harvest"))
        tracker = self.tracker
        assert isinstance(tracker, RingTracker)  # `start` runs this thread in ring mode only
        # HOST-NOTES: on PVM a ring that fills under emulated guest code livelocks the vCPU and
        # loses entries, and emulated stores push ~600 k entries/s per vCPU: a 65,536-entry ring
        # fills in ~110 ms. A normal thread on a busy 2-core host was kept off the CPU that long
        # (gaps up to 113 ms measured); at SCHED_FIFO priority 1 every gap stayed under ~17 ms.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))  # this thread only
            self.harvester_realtime = True
        except OSError:  # EPERM without CAP_SYS_NICE / RLIMIT_RTPRIO: run as a normal thread
            self.harvester_realtime = False
        try:
            while not self._harvest_stop.is_set():
                if tracker.wait_for_harvest(self._harvest_interval_s):
                    tracker.poll()
        except BaseException as err:
            self.harvester_error = err
            self.pause()

    THROTTLE_PERIOD_S = 0.01

    def set_throttle(self, share: float) -> None:
        """Hold every vCPU out of KVM_RUN for `share` of every 10 ms (0 = off): the whole-VM
        throttle, the same share for each vCPU (`set_vcpu_throttle`)."""
        self.set_vcpu_throttle([share] * len(self.vcpus))

    def set_vcpu_throttle(self, shares: Sequence[float]) -> None:
        """Hold vCPU i out of KVM_RUN for `shares[i]` of every 10 ms (0: it runs free; all 0:
        the throttle thread ends and every hold is released).

        For a guest that dirties memory faster than it can be sent: a hold costs one KVM_RUN exit
        (~8 us here, HOST-NOTES), so a 10 ms period throttles finely. A hold is not a pause: a
        held vCPU answers `pause()` at once (it is parked already) and lifting the throttle never
        runs a vCPU that `pause()` stopped."""
        if len(shares) != len(self.vcpus):
            raise VmConfigError(f"{len(shares)} throttle shares for {len(self.vcpus)} vCPUs")
        for index, share in enumerate(shares):
            if not 0.0 <= share < 1.0:
                raise VmConfigError(f"vCPU {index}: throttle share {share}: from 0 (off) up to, not including, 1")
        thread = self._throttle_thread
        if not any(shares):
            if thread is not None:
                self._throttle_stop.set()
                thread.join()
                self._throttle_thread = None
            self._throttle_shares = ()
            for vcpu in self.vcpus:
                vcpu.release()
            return
        self._throttle_shares = tuple(shares)  # read whole by the loop at each period
        if thread is None:
            self._throttle_stop.clear()
            self._throttle_thread = threading.Thread(
                target=self._throttle_loop, name=f"{self.name}-throttle", daemon=True
            )
            self._throttle_thread.start()

    @property
    def throttle_share(self) -> float:
        """The largest share in force (0: no throttle)."""
        return max(self.vcpu_throttle_shares, default=0.0)

    @property
    def vcpu_throttle_shares(self) -> tuple[float, ...]:
        """Each vCPU's share in force (all 0 without a throttle)."""
        if self._throttle_thread is None or not self._throttle_shares:
            return (0.0,) * len(self.vcpus)
        return self._throttle_shares

    def _throttle_loop(self) -> None:
        name_this_thread(kernel_name(self.name, "throttle"))
        # Each period: hold every throttled vCPU, release each when its share has passed, then
        # let all run to the period's end.
        while not self._throttle_stop.is_set():
            shares = self._throttle_shares
            started = time.monotonic()
            held = sorted((share, index) for index, share in enumerate(shares) if share > 0)
            for _, index in held:
                self.vcpus[index].hold()
            for share, index in held:
                if self._throttle_stop.wait(max(0.0, started + share * self.THROTTLE_PERIOD_S - time.monotonic())):
                    return  # set_vcpu_throttle releases the holds
                self.vcpus[index].release()
            self._throttle_stop.wait(max(0.0, started + self.THROTTLE_PERIOD_S - time.monotonic()))

    def pause(self) -> None:
        """Stop every vCPU; returns once every vCPU thread has left KVM_RUN and parked."""
        for vcpu in self.vcpus:
            vcpu.request_pause()
        for vcpu in self.vcpus:
            vcpu.wait_parked()

    def pause_within(self, seconds: float) -> bool:
        """`pause`, waiting at most `seconds` in all: False if a vCPU had not parked by then (the
        request stands: a later `pause` waits for the rest)."""
        for vcpu in self.vcpus:
            vcpu.request_pause()
        deadline = time.monotonic() + seconds
        try:
            for vcpu in self.vcpus:
                vcpu.wait_parked(max(0.0, deadline - time.monotonic()))
        except VcpuError:
            return False
        return True

    def resume(self) -> None:
        for vcpu in self.vcpus:
            vcpu.resume()

    @property
    def running(self) -> bool:
        return any(v.state is VcpuRunState.RUNNING for v in self.vcpus)

    def close(self) -> None:
        """Stop threads, unmap and close everything; safe to call twice."""
        if self._throttle_thread is not None:
            self._throttle_stop.set()
            self._throttle_thread.join()
            self._throttle_thread = None
            self._throttle_shares = ()
        self._harvest_stop.set()
        if isinstance(self.tracker, RingTracker):
            self.tracker.stop_waiting()
        for vcpu in self.vcpus:
            vcpu.stop()
        if self._harvester is not None:
            self._harvester.join()
            self._harvester = None
        if isinstance(self.tracker, RingTracker):
            self.tracker.remove_rings()
        self.tracker = None
        for address, size in self._vcpu_maps:
            munmap(address, size)
        self._vcpu_maps.clear()
        for vcpu in self.vcpus:
            os.close(vcpu.fd)
        self.vcpus.clear()
        if self.arm is not None:
            self.arm.close()  # the vGIC and ITS device fds
            self.arm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # The memslots die with the VM fd; only then may the RAM go.
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.memslots.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
