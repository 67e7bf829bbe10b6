"""The arm64 KVM layer (migrated/kvm/arch/aarch64/ and the Vm hooks it implements) on a real arm64 KVM.

Runs only in the arm64 lane (`make test-arm64`). The guest is a few instruction words written
into RAM by the test (MMU off, as KVM_ARM_VCPU_INIT leaves the vCPU; PC set with ONE_REG), e.g.

    loop:  str x1, [x0]        f9000001
           add x1, x1, #1      91000421
           b   loop            17fffffe

(encodings checked with aarch64-linux-gnu-as and objdump). The ITS is programmed from the VMM
side, as the guest's driver would: redistributor PROPBASER/PENDBASER/EnableLPIs, GITS_BASER0/1,
GITS_CBASER, GITS_CTLR, and MAPD, MAPC, MAPTI, INT commands in a command queue in guest RAM that
GITS_CWRITER hands to the ITS.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

from helpers import wait_for

from migrated.kvm import _libc, uapi
from migrated.kvm.arch.aarch64 import uapi as arm_uapi
from migrated.kvm import vcpu as vcpu_module
from migrated.kvm import vm as vm_module
from migrated.kvm.arch import aarch64
from migrated.kvm.arch.aarch64 import devices as aarch64_devices
from migrated.kvm.arch.aarch64 import registers as aarch64_registers
from migrated.kvm.errors import DirtyTrackingOrderError, KvmIoctlError
from migrated.kvm.memory import PAGE_SHIFT, GuestMemory
from migrated.kvm.system import Kvm
from migrated.kvm import arch, saved_state
from migrated.kvm.vm import Vm, VmConfig

pytestmark = pytest.mark.arm64

MIB = 1 << 20
RAM = aarch64.RAM_BASE
MEMORY = 8 * MIB
RING_BYTES = 64 << 10

LOOP = (0xF9000001, 0x91000421, 0x17FFFFFE)  # str x1, [x0]; add x1, x1, #1; b .-8
CODE = RAM  # the program
COUNTER = RAM + 0x1_0000  # where it stores x1

# ITS and LPI tables in guest RAM (layout of this test, 64 KiB aligned where the GIC wants it).
PROP_TABLE = RAM + 0x10_0000  # LPI configuration table (GICR_PROPBASER)
PROP_ID_BITS = 13  # GICR_PROPBASER.IDbits: 14 interrupt ID bits, LPIs 8192..16383
PEND_TABLES = RAM + 0x20_0000  # LPI pending table of vCPU n at + n * 64 KiB (GICR_PENDBASER)
DEVICE_TABLE = RAM + 0x30_0000  # GITS_BASER0
COLLECTION_TABLE = RAM + 0x31_0000  # GITS_BASER1
COMMAND_QUEUE = RAM + 0x32_0000  # GITS_CBASER, one 4 KiB page
ITT = RAM + 0x33_0000  # the device's interrupt translation table
LPI = 8192
DEVICE_ID = 1
EVENT_ID = 0
TABLE_PAGES = frozenset(
    (gpa - RAM) >> PAGE_SHIFT for gpa in (DEVICE_TABLE, COLLECTION_TABLE, ITT, PEND_TABLES + LPI // 8)
)

GITS_BASER_VALID = 1 << 63
GITS_BASER_PAGE_SIZE_64K = 0b10 << 8
GITS_CBASER_VALID = 1 << 63
GICR_CTLR_ENABLE_LPIS = 1
ITS_CMD_BYTES = 32


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture
def made() -> Iterator[list[Vm]]:
    """VMs made by a test, closed after it."""
    vms: list[Vm] = []
    yield vms
    for vm in vms:
        vm.close()


def create_vm(kvm: Kvm, made: list[Vm], vcpus: int = 1) -> Vm:
    vm = arch.create_vm(
        kvm,
        VmConfig(memory_bytes=MEMORY, vcpus=vcpus, dirty_tracking="ring", ring_bytes=RING_BYTES),
    )
    made.append(vm)
    return vm


def load_loop(vm: Vm, vcpu: int = 0) -> None:
    """The loop on `vcpu`, counting at COUNTER + 8 * vcpu."""
    vm.write_guest(CODE, struct.pack(f"<{len(LOOP)}I", *LOOP))
    aarch64.set_reg(vm.vcpus[vcpu], "PC", CODE)
    aarch64.set_reg(vm.vcpus[vcpu], "X0", COUNTER + 8 * vcpu)
    aarch64.set_reg(vm.vcpus[vcpu], "X1", 0)


def power_on(vm: Vm, vcpu: int) -> None:
    """What PSCI CPU_ON would do for a secondary that KVM_ARM_VCPU_INIT left powered off."""
    mp = uapi.kvm_mp_state(mp_state=uapi.KVM_MP_STATE_RUNNABLE)
    vm.vcpus[vcpu].ioctl("KVM_SET_MP_STATE", uapi.KVM_SET_MP_STATE, mp)


def counter(vm: Vm, vcpu: int = 0) -> int:
    assert vm.memory is not None
    return int.from_bytes(bytes(vm.memory.read(COUNTER + 8 * vcpu, 8)), "little")


def run_a_while(vm: Vm, iterations: int = 1000) -> int:
    """Start the vCPU threads, let the loop count past `iterations`, park them; the count."""
    start = counter(vm)
    vm.start()
    wait_for(lambda: counter(vm) >= start + iterations, 60.0, "the guest loop to count", interval=0.01)
    vm.pause()
    return counter(vm)


class Recorder:
    """Every ioctl the VM layer and aarch64.py send, with the detail that tells them apart."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Any]] = []

    def wrap(self, real: Callable[..., int]) -> Callable[..., int]:
        def recording(fd: int, request: int, arg: Any = 0) -> int:
            detail: Any = None
            if isinstance(arg, uapi.kvm_enable_cap):
                detail = int(arg.cap)
            elif isinstance(arg, uapi.kvm_device_attr):
                detail = (int(arg.group), int(arg.attr))
            elif isinstance(arg, uapi.kvm_one_reg):
                detail = int(arg.id)
            elif isinstance(arg, uapi.kvm_create_device):
                detail = int(arg.type)
            elif isinstance(arg, uapi.kvm_userspace_memory_region):
                detail = int(arg.guest_phys_addr)
            self.calls.append((request, detail))
            return real(fd, request, arg)

        return recording

    def index(self, request: int, detail: Any = None, last: bool = False) -> int:
        hits = [i for i, (r, d) in enumerate(self.calls) if r == request and (detail is None or d == detail)]
        assert hits, f"ioctl {request:#x} ({detail}) was not sent"
        return hits[-1] if last else hits[0]

    def attr_sets(self) -> list[tuple[int, int]]:
        return [d for r, d in self.calls if r == uapi.KVM_SET_DEVICE_ATTR]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    record_ioctls(monkeypatch, rec)
    return rec


def record_ioctls(monkeypatch: pytest.MonkeyPatch, rec: Recorder) -> None:
    """Every ioctl the VM layer sends: on VM fds, vCPU fds and device fds."""
    for module in (vm_module, vcpu_module, aarch64_devices, aarch64_registers):
        monkeypatch.setattr(module, "ioctl", rec.wrap(_libc.ioctl))


def redist_set(vm: Vm, vcpu: int, offset: int, value: int, bits: int = 32) -> None:
    """Write a redistributor register of one vCPU (64-bit ones as two 32-bit halves)."""
    assert vm.arm is not None and vm.arm.vgic is not None
    mpidr = aarch64.mpidr(vm.vcpus[vcpu])
    for half in range(bits // 32):
        attr = aarch64.vgic_mpidr(mpidr) << 32 | offset + 4 * half
        vm.arm.vgic.set(
            "test",
            arm_uapi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
            attr,
            value >> (32 * half) & 0xFFFF_FFFF,
            bits=32,
        )


def its_set(vm: Vm, offset: int, value: int) -> None:
    assert vm.arm is not None and vm.arm.its is not None
    vm.arm.its.set("test", arm_uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS, offset, value)


def its_get(vm: Vm, offset: int) -> int:
    assert vm.arm is not None and vm.arm.its is not None
    return vm.arm.its.get("test", arm_uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS, offset)


def its_command(dw0: int, dw1: int = 0, dw2: int = 0, dw3: int = 0) -> bytes:
    return struct.pack("<4Q", dw0, dw1, dw2, dw3)


def program_its(vm: Vm) -> None:
    """What a guest's GICv3/ITS driver does, done by the VMM: LPIs on, one device (DEVICE_ID)
    whose event EVENT_ID is LPI 8192 on collection 0 (vCPU 0), and that LPI made pending."""
    # The LPI configuration table: priority 0xa0, enabled.
    vm.write_guest(PROP_TABLE + LPI - 8192, bytes([0xA0 | 1]))
    for n in range(len(vm.vcpus)):
        redist_set(vm, n, aarch64.GICR_PROPBASER, PROP_TABLE | PROP_ID_BITS, bits=64)
        redist_set(vm, n, aarch64.GICR_PENDBASER, PEND_TABLES + n * 0x1_0000, bits=64)
        redist_set(vm, n, aarch64.GICR_CTLR, GICR_CTLR_ENABLE_LPIS)
    its_set(vm, aarch64.GITS_BASER[0], GITS_BASER_VALID | GITS_BASER_PAGE_SIZE_64K | DEVICE_TABLE)
    its_set(vm, aarch64.GITS_BASER[1], GITS_BASER_VALID | GITS_BASER_PAGE_SIZE_64K | COLLECTION_TABLE)
    its_set(vm, aarch64.GITS_CBASER, GITS_CBASER_VALID | COMMAND_QUEUE)  # Size 0: one 4 KiB page
    its_set(vm, aarch64.GITS_CTLR, 1)
    commands = b"".join(
        (
            # MAPD: DeviceID, Size = EventID bits - 1, ITT address bits [51:8], Valid.
            its_command(0x08 | DEVICE_ID << 32, 1, ITT | 1 << 63),
            # MAPC: ICID 0 -> RDbase 0 (processor number: GITS_TYPER.PTA is 0), Valid.
            its_command(0x09, 0, 0 | 0 << 16 | 1 << 63),
            # MAPTI: DeviceID, EventID -> pINTID on ICID 0.
            its_command(0x0A | DEVICE_ID << 32, EVENT_ID | LPI << 32, 0),
            # INT: DeviceID, EventID: the LPI becomes pending on vCPU 0.
            its_command(0x03 | DEVICE_ID << 32, EVENT_ID),
        )
    )
    vm.write_guest(COMMAND_QUEUE, commands)
    its_set(vm, aarch64.GITS_CWRITER, len(commands))
    assert its_get(vm, aarch64.GITS_CREADR) == len(commands), "the ITS did not consume the commands"


def table_bytes(vm: Vm) -> dict[str, bytes]:
    assert vm.memory is not None
    return {
        "device table entry": bytes(vm.memory.read(DEVICE_TABLE + 8 * DEVICE_ID, 8)),
        "collection table": bytes(vm.memory.read(COLLECTION_TABLE, 16)),
        "interrupt translation entry": bytes(vm.memory.read(ITT + 8 * EVENT_ID, 8)),
        "pending byte": bytes(vm.memory.read(PEND_TABLES + LPI // 8, 1)),
    }


def clear_tables(vm: Vm) -> None:
    for gpa, size in (
        (DEVICE_TABLE, 4096),
        (COLLECTION_TABLE, 4096),
        (ITT, 4096),
        (PEND_TABLES, 4096),
    ):
        vm.write_guest(gpa, bytes(size))


# --------------------------------------------------------------------------------------------
# Creation order (R1, R2) and the refusals
# --------------------------------------------------------------------------------------------
def test_create_orders_ring_bitmap_memslot_vcpus_init_and_gic(kvm: Kvm, made: list[Vm], recorder: Recorder) -> None:
    vm = create_vm(kvm, made, vcpus=2)
    assert vm.dirty_tracking == "ring" and vm.ring_acq_rel and vm.with_bitmap
    ring = recorder.index(uapi.KVM_ENABLE_CAP, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
    with_bitmap = recorder.index(uapi.KVM_ENABLE_CAP, uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    memslot = recorder.index(uapi.KVM_SET_USER_MEMORY_REGION)
    first_vcpu = recorder.index(uapi.KVM_CREATE_VCPU)
    last_vcpu = recorder.index(uapi.KVM_CREATE_VCPU, last=True)
    first_init = recorder.index(arm_uapi.KVM_ARM_VCPU_INIT)
    last_init = recorder.index(arm_uapi.KVM_ARM_VCPU_INIT, last=True)
    vgic = recorder.index(uapi.KVM_CREATE_DEVICE, uapi.KVM_DEV_TYPE_ARM_VGIC_V3)
    vgic_init = recorder.index(
        uapi.KVM_SET_DEVICE_ATTR, (arm_uapi.KVM_DEV_ARM_VGIC_GRP_CTRL, arm_uapi.KVM_DEV_ARM_VGIC_CTRL_INIT)
    )
    its = recorder.index(uapi.KVM_CREATE_DEVICE, uapi.KVM_DEV_TYPE_ARM_VGIC_ITS)
    # R1, R2: ring, WITH_BITMAP, memslot; api.rst: every vCPU before KVM_ARM_VCPU_INIT;
    # arm-vgic-v3.rst: CTRL_INIT after every vCPU; the ITS after the vGIC.
    assert ring < with_bitmap < memslot < first_vcpu < last_vcpu < first_init <= last_init
    assert last_init < vgic < vgic_init < its
    assert [d for r, d in recorder.calls if r == uapi.KVM_ENABLE_CAP] == [
        uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
        uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    ]
    assert recorder.calls[memslot][1] == aarch64.RAM_BASE
    assert [r for r, _ in recorder.calls].count(arm_uapi.KVM_ARM_VCPU_INIT) == 2
    assert vm.memory is not None and vm.memory.regions[0].guest_phys_addr == aarch64.RAM_BASE


def test_with_bitmap_after_memslot_is_refused_before_the_kernel_sees_it(kvm: Kvm, recorder: Recorder) -> None:
    vm = Vm(kvm, kvm.caps(), arch.host_arch())
    try:
        vm.enable_dirty_ring(RING_BYTES)
        vm.add_memory(aarch64.guest_memory(2 * MIB))
        with pytest.raises(DirtyTrackingOrderError, match="R2.*before the first memslot"):
            vm.enable_ring_with_bitmap()
        assert [r for r, _ in recorder.calls].count(uapi.KVM_ENABLE_CAP) == 1
    finally:
        vm.close()


def test_kernel_itself_refuses_with_bitmap_after_a_memslot(
    vm_fd: int,
    enable_cap: Callable[..., int],
    set_memslot: Callable[..., int],
    guest_memory: Callable[[int], GuestMemory],
) -> None:
    """What our check saves us from: the kernel's own EINVAL for R2 on a raw VM fd ("all
    memslots empty" is what it checks: with the slot deleted again it accepts)."""
    memory = guest_memory(2 * MIB)
    assert enable_cap(vm_fd, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, RING_BYTES) == 0
    set_memslot(vm_fd, 0, RAM, 2 * MIB, memory.address)
    with pytest.raises(OSError) as info:
        enable_cap(vm_fd, uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    assert info.value.errno == errno.EINVAL
    set_memslot(vm_fd, 0, RAM, 0, memory.address)
    assert enable_cap(vm_fd, uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) == 0


# --------------------------------------------------------------------------------------------
# vCPU init and ONE_REG
# --------------------------------------------------------------------------------------------
def test_vcpu_init_psci_and_secondaries_powered_off(kvm: Kvm, made: list[Vm]) -> None:
    vm = create_vm(kvm, made, vcpus=2)
    assert vm.arm is not None
    preferred = aarch64.preferred_target(vm)
    assert vm.arm.target == preferred.target
    assert vm.arm.features & 1 << arm_uapi.KVM_ARM_VCPU_PSCI_0_2
    assert not vm.arm.features & 1 << arm_uapi.KVM_ARM_VCPU_POWER_OFF
    states = []
    for vcpu in vm.vcpus:
        mp = uapi.kvm_mp_state()
        vcpu.ioctl("KVM_GET_MP_STATE", uapi.KVM_GET_MP_STATE, mp)
        states.append(mp.mp_state)
    assert states == [uapi.KVM_MP_STATE_RUNNABLE, uapi.KVM_MP_STATE_STOPPED]
    # PSCI 0.2 or later (a "future revision backward compatible with v0.2"): major >= 0, 0.2+.
    assert aarch64.get_reg(vm.vcpus[0], arm_uapi.KVM_REG_ARM_PSCI_VERSION) >= 2
    # The reset state: EL1h with DAIF masked (PSTATE 0x3c5), MMU off (SCTLR_EL1.M clear).
    assert aarch64.get_reg(vm.vcpus[0], "PSTATE") == 0x3C5
    assert aarch64.get_reg(vm.vcpus[0], aarch64.SCTLR_EL1) & 1 == 0
    for n, vcpu in enumerate(vm.vcpus):
        assert aarch64.mpidr(vcpu) & 0xFF == n  # Aff0 of vCPU n


def test_one_reg_round_trips_u32_u64_u128(kvm: Kvm, made: list[Vm]) -> None:
    vm = create_vm(kvm, made)
    vcpu = vm.vcpus[0]
    values = {
        "PC": RAM + 0x40,
        "X0": 0x0123_4567_89AB_CDEF,
        "X30": 0xFEDC_BA98_7654_3210,
        "SP_EL1": RAM + 0x8000,
        "V0": 0x0011_2233_4455_6677_8899_AABB_CCDD_EEFF,
        "V31": (1 << 128) - 1,
        "FPSR": 0x0800_0000,  # QC
        "FPCR": 0x0040_0000,  # RMode = +inf
    }
    for name, value in values.items():
        aarch64.set_reg(vcpu, name, value)
    assert {name: aarch64.get_reg(vcpu, name) for name in values} == values
    assert aarch64.reg_size(aarch64.CORE_REGS["V0"]) == 16
    assert aarch64.reg_size(aarch64.CORE_REGS["FPCR"]) == 4
    with pytest.raises(ValueError, match="32 bits wide"):
        aarch64.set_reg(vcpu, "FPSR", 1 << 32)


def test_reg_list_names_core_timer_and_system_registers(kvm: Kvm, made: list[Vm]) -> None:
    vm = create_vm(kvm, made)
    ids = aarch64.reg_list(vm.vcpus[0])
    assert len(ids) == len(set(ids)) > 100
    assert set(aarch64.CORE_REGS.values()) <= set(ids)
    timer = {arm_uapi.KVM_REG_ARM_TIMER_CTL, arm_uapi.KVM_REG_ARM_TIMER_CVAL, arm_uapi.KVM_REG_ARM_TIMER_CNT}
    assert timer <= set(ids)
    assert {aarch64.MPIDR_EL1, aarch64.SCTLR_EL1} <= set(ids)
    assert all(i & uapi.KVM_REG_ARCH_MASK == uapi.KVM_REG_ARM64 for i in ids)


# --------------------------------------------------------------------------------------------
# vGIC and ITS
# --------------------------------------------------------------------------------------------
def test_vgic_and_its_are_created_where_the_layout_says(kvm: Kvm, made: list[Vm]) -> None:
    vm = create_vm(kvm, made, vcpus=2)
    assert vm.arm is not None and vm.arm.vgic is not None and vm.arm.its is not None
    vgic = vm.arm.vgic
    addr = arm_uapi.KVM_DEV_ARM_VGIC_GRP_ADDR
    assert vgic.get("t", addr, arm_uapi.KVM_VGIC_V3_ADDR_TYPE_DIST) == aarch64.GICD_BASE
    assert vgic.get("t", addr, arm_uapi.KVM_VGIC_V3_ADDR_TYPE_REDIST) == aarch64.GICR_BASE
    assert aarch64.its_address(vm) == aarch64.ITS_BASE
    assert vgic.get("t", arm_uapi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, bits=32) == aarch64.NR_IRQS
    # GICD_TYPER: ITLinesNumber = NR_IRQS / 32 - 1, LPIS set because the VM has an ITS.
    typer = vgic.get("t", arm_uapi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0x4, bits=32)
    assert typer & 0x1F == aarch64.NR_IRQS // 32 - 1
    assert typer & 1 << 17
    assert vgic.has(arm_uapi.KVM_DEV_ARM_VGIC_GRP_CTRL, arm_uapi.KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES)
    assert vm.arm.its.has(arm_uapi.KVM_DEV_ARM_VGIC_GRP_CTRL, arm_uapi.KVM_DEV_ARM_ITS_SAVE_TABLES)
    # GITS_IIDR: implementer ARM (0x43b), product KVM; the ITS is off until a driver enables it.
    assert its_get(vm, aarch64.GITS_IIDR) & 0xFFF == 0x43B
    assert its_get(vm, aarch64.GITS_CTLR) & 1 == 0
    # The vGIC is initialized: a second NR_IRQS is refused ("-EBUSY Value has already be set").
    with pytest.raises(KvmIoctlError) as info:
        vgic.set("t", arm_uapi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, 128, bits=32)
    assert info.value.errno == errno.EBUSY


def test_closing_the_vm_closes_the_device_fds(kvm: Kvm) -> None:
    import os

    vm = arch.create_vm(kvm, VmConfig(memory_bytes=MEMORY, vcpus=1))
    assert vm.arm is not None and vm.arm.vgic is not None and vm.arm.its is not None
    fds = (vm.arm.vgic.fd, vm.arm.its.fd)
    vm.close()
    assert vm.arm is None
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_guest_loop_runs_from_ram_and_its_writes_reach_the_ring(kvm: Kvm, made: list[Vm]) -> None:
    vm = create_vm(kvm, made)
    load_loop(vm)
    assert vm.tracker is not None
    vm.tracker.collect()  # the loader's own writes (R5)
    count = run_a_while(vm)
    assert count >= 1000
    assert aarch64.get_reg(vm.vcpus[0], "X1") >= count
    pages = vm.tracker.collect().by_slot[0]
    assert (COUNTER - RAM) >> PAGE_SHIFT in set(pages.tolist())


# --------------------------------------------------------------------------------------------
# The ITS tables (R6.3)
# --------------------------------------------------------------------------------------------
def test_table_saves_answer_ebusy_while_a_vcpu_runs_and_succeed_when_parked(kvm: Kvm, made: list[Vm]) -> None:
    vm = create_vm(kvm, made, vcpus=2)
    program_its(vm)
    load_loop(vm)
    vm.start()
    try:
        wait_for(lambda: counter(vm) > 1000, 60.0, "the guest loop to count", interval=0.01)
        with pytest.raises(KvmIoctlError, match="VGIC_SAVE_PENDING_TABLES") as info:
            aarch64.save_its_tables(vm)
        assert info.value.errno == errno.EBUSY
        assert vm.arm is not None and vm.arm.its is not None
        with pytest.raises(KvmIoctlError) as its_info:
            vm.arm.its.ctrl("ITS_SAVE_TABLES", arm_uapi.KVM_DEV_ARM_ITS_SAVE_TABLES)
        assert its_info.value.errno == errno.EBUSY
    finally:
        vm.pause()
    aarch64.save_its_tables(vm)  # both return 0 with every vCPU parked


def test_table_saves_write_guest_ram_seen_only_by_the_backup_bitmap(kvm: Kvm, made: list[Vm]) -> None:
    """The seed's scenario: ITS_SAVE_TABLES writes guest RAM without a running vCPU; the rings
    never see it, KVM_GET_DIRTY_LOG (the backup bitmap, R6.4) does."""
    vm = create_vm(kvm, made)
    program_its(vm)
    load_loop(vm)
    run_a_while(vm)
    tracker = vm.tracker
    assert tracker is not None
    tracker.collect()
    baseline = tracker.collect_backup_bitmap()
    assert baseline is not None
    aarch64.save_its_tables(vm)
    rings = set(tracker.collect().by_slot[0].tolist())
    backup = tracker.collect_backup_bitmap()
    assert backup is not None
    assert set(backup.by_slot[0].tolist()) == TABLE_PAGES
    assert not rings & TABLE_PAGES
    tables = table_bytes(vm)
    assert tables["device table entry"] != bytes(8)
    assert tables["interrupt translation entry"] != bytes(8)
    assert tables["pending byte"] == bytes([1 << (LPI % 8)])


# --------------------------------------------------------------------------------------------
# State: save, the wire, restore (R9)
# --------------------------------------------------------------------------------------------
SPI = 40  # an SPI whose input line the source's "device" holds high


def saved_source(kvm: Kvm, made: list[Vm], second_runs: bool = False) -> tuple[Vm, aarch64.Arm64MachineState, int]:
    """A two-vCPU VM that ran, with the ITS in use and an SPI line high, paused and saved as the
    downtime does (R6). vCPU 1 stays powered off, or runs the loop too (`second_runs`)."""
    vm = create_vm(kvm, made, vcpus=2)
    program_its(vm)
    # SPIs start edge-triggered; KVM keeps an input level only for level-triggered ones
    # (GICD_ICFGR: two bits per interrupt, the upper one set for edge, clear for level).
    assert vm.arm is not None and vm.arm.vgic is not None
    dist, icfgr = arm_uapi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, aarch64.GICD_ICFGR + 4 * (SPI // 16)
    config = vm.arm.vgic.get("test", dist, icfgr, bits=32) & ~(0b10 << 2 * (SPI % 16))
    vm.arm.vgic.set("test", dist, icfgr, config, bits=32)
    aarch64.set_spi_level(vm, SPI, True)
    load_loop(vm)
    if second_runs:
        load_loop(vm, 1)
        power_on(vm, 1)
    count = run_a_while(vm)
    assert vm.tracker is not None
    vm.tracker.collect()  # R6.2
    aarch64.save_its_tables(vm)  # R6.3
    state = aarch64.save_vm_state(vm)
    wire = msgpack.packb(state.to_wire(), use_bin_type=True)
    return vm, aarch64.Arm64MachineState.from_wire(msgpack.unpackb(wire, raw=False)), count


def copy_memory(source: Vm, target: Vm) -> None:
    assert source.memory is not None and target.memory is not None
    target.memory.bytes[:] = source.memory.bytes


def comparable(state: aarch64.Arm64MachineState) -> dict[str, Any]:
    wire = state.to_wire()
    for vcpu in wire["vcpus"]:
        vcpu["regs"] = [[i, v] for i, v in vcpu["regs"] if i not in aarch64.COUNTER_REGS]
    return wire


@pytest.mark.parametrize("second_runs", [False, True], ids=["vcpu1-off", "vcpu1-running"])
def test_state_round_trip_into_a_fresh_vm(kvm: Kvm, made: list[Vm], second_runs: bool) -> None:
    source, state, count = saved_source(kvm, made, second_runs)
    assert state.has_its and len(state.vcpus) == 2
    assert state.vcpus[0].reg("PC") is not None and state.vcpus[0].reg("X1") is not None
    assert state.vcpus[1].mp_state == (uapi.KVM_MP_STATE_RUNNABLE if second_runs else uapi.KVM_MP_STATE_STOPPED)
    assert dict(state.line_levels)[SPI - SPI % 32] == 1 << SPI % 32
    target = create_vm(kvm, made, vcpus=2)
    copy_memory(source, target)  # R9: memory first
    aarch64.restore_vm_state(target, state)
    again = aarch64.save_vm_state(target)
    assert comparable(again) == comparable(state)
    # The ITS and LPI state came back from the tables: wipe them in the target's RAM and let
    # the target write them from its own state.
    expected = table_bytes(source)
    clear_tables(target)
    aarch64.save_its_tables(target)
    assert table_bytes(target) == expected
    # The guest carries on from where it stopped, on both vCPUs if both ran.
    second = counter(source, 1)
    target.start()
    wait_for(lambda: counter(target) > count + 1000, 60.0, "the restored guest to count on", interval=0.01)
    if second_runs:
        wait_for(lambda: counter(target, 1) > second + 1000, 60.0, "vCPU 1 to count on", interval=0.01)
    target.pause()
    if not second_runs:
        assert counter(target, 1) == 0  # still powered off


def test_restore_follows_the_its_restore_sequence(kvm: Kvm, made: list[Vm], monkeypatch: pytest.MonkeyPatch) -> None:
    """arm-vgic-its.rst: memory and vCPUs, redistributors, ITS base address, GITS_CBASER, the
    other GITS_ registers (GITS_IIDR, GITS_CREADR after GITS_CBASER), RESTORE_TABLES,
    GITS_CTLR. The target's ITS is created without its base address, which the restore
    provides at step c)."""
    source, state, _ = saved_source(kvm, made)
    target = Vm(kvm, kvm.caps(), arch.host_arch(), "target")
    made.append(target)
    target.enable_dirty_ring(RING_BYTES)
    target.enable_ring_with_bitmap()
    target.add_memory(aarch64.guest_memory(MEMORY))
    for index in range(2):
        target.create_vcpu(index)
    aarch64.init_vcpus(target)
    aarch64.create_vgic(target)
    aarch64.create_its(target, address=None)
    assert aarch64.its_address(target) is None
    target.finish_setup()
    copy_memory(source, target)
    rec = Recorder()
    record_ioctls(monkeypatch, rec)
    aarch64.restore_vm_state(target, state)

    def first(group: int, attr: int | None = None, last: bool = False) -> int:
        hits = [
            i
            for i, (r, d) in enumerate(rec.calls)
            if r == uapi.KVM_SET_DEVICE_ATTR and d[0] == group and (attr is None or d[1] == attr)
        ]
        assert hits, f"no KVM_SET_DEVICE_ATTR for group {group} attr {attr}"
        return hits[-1] if last else hits[0]

    G = arm_uapi  # noqa: N806 - short alias for the group names
    last_one_reg = rec.index(uapi.KVM_SET_ONE_REG, last=True)
    dist, dist_end = first(G.KVM_DEV_ARM_VGIC_GRP_DIST_REGS), first(G.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, last=True)
    redist, redist_end = first(G.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS), first(G.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, last=True)
    icc = first(G.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS)
    its_addr = first(G.KVM_DEV_ARM_VGIC_GRP_ADDR, G.KVM_VGIC_ITS_ADDR_TYPE)
    its_regs = G.KVM_DEV_ARM_VGIC_GRP_ITS_REGS
    cbaser = first(its_regs, aarch64.GITS_CBASER)
    iidr = first(its_regs, aarch64.GITS_IIDR)
    creadr = first(its_regs, aarch64.GITS_CREADR)
    cwriter = first(its_regs, aarch64.GITS_CWRITER)
    basers = [first(its_regs, reg) for reg in aarch64.GITS_BASER]
    tables = first(G.KVM_DEV_ARM_VGIC_GRP_CTRL, G.KVM_DEV_ARM_ITS_RESTORE_TABLES)
    ctlr = first(its_regs, aarch64.GITS_CTLR)
    assert rec.calls[dist][1] == (G.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, aarch64.GICD_IIDR)
    assert last_one_reg < dist <= dist_end < redist <= redist_end < icc < its_addr
    assert its_addr < cbaser < iidr < creadr < cwriter < min(basers)
    assert max(basers) < tables < ctlr
    assert ctlr == len(rec.calls) - 1  # GITS_CTLR last of all
    assert aarch64.its_address(target) == aarch64.ITS_BASE
    assert its_get(target, aarch64.GITS_CTLR) & 1  # enabled, as the source's was
    assert comparable(aarch64.save_vm_state(target)) == comparable(state)


def test_restore_refuses_a_different_machine(kvm: Kvm, made: list[Vm]) -> None:
    source, state, _ = saved_source(kvm, made)
    single = create_vm(kvm, made, vcpus=1)
    with pytest.raises(saved_state.IncompatibleStateError, match="2 vCPU"):
        aarch64.restore_vm_state(single, state)


def test_save_refuses_running_vcpus(kvm: Kvm, made: list[Vm]) -> None:
    vm = create_vm(kvm, made)
    load_loop(vm)
    vm.start()
    try:
        wait_for(lambda: counter(vm) > 100, 60.0, "the guest loop to count", interval=0.01)
        with pytest.raises(saved_state.StateError, match="pause the VM"):
            aarch64.save_vm_state(vm)
    finally:
        vm.pause()


# --------------------------------------------------------------------------------------------
# The wire format
# --------------------------------------------------------------------------------------------
@pytest.fixture
def wire(kvm: Kvm, made: list[Vm]) -> dict[str, Any]:
    vm = create_vm(kvm, made, vcpus=2)
    state = aarch64.save_vm_state(vm)
    unpacked: dict[str, Any] = msgpack.unpackb(msgpack.packb(state.to_wire(), use_bin_type=True), raw=False)
    return unpacked


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda w: w.update(version=99), "version 99 is newer"),
        (lambda w: w.pop("dist"), "missing key"),
        (lambda w: w.update(extra=1), "unknown key"),
        (lambda w: w.update(arch="x86_64"), "arm64 state reader"),
        (lambda w: w.update(nr_irqs=100), "multiple of 32"),
        (lambda w: w["vcpus"][1].update(index=0), "vcpus\\[1\\].index"),
        (lambda w: w["vcpus"][0]["regs"][0].__setitem__(1, b"\0"), "its id says 8"),
        (lambda w: w["vcpus"][0]["regs"].append(list(w["vcpus"][0]["regs"][0])), "appears twice"),
        (lambda w: w["vcpus"][0].update(events=b"\0" * 3), "struct kvm_vcpu_events"),
        (lambda w: w["vcpus"][0].update(mp_state=7), "not an arm64 KVM_MP_STATE"),
        (lambda w: w["dist"].pop(), "missing, the first"),
        (lambda w: w["dist"].__setitem__(-1, [0x7FFC, 0]), "not a register saved here"),
        (lambda w: w["vcpus"][0]["redist"].pop(), "missing"),
        (lambda w: w["its"].pop(), "missing"),
        (lambda w: w.update(its_base=0), "disagree"),
        (lambda w: w["dist"][0].__setitem__(1, 1 << 32), "outside"),
        (lambda w: w["vcpus"][0]["regs"].clear(), "MPIDR_EL1 is missing"),
    ],
)
def test_malformed_state_is_refused_naming_the_field(
    wire: dict[str, Any], mutate: Callable[[dict[str, Any]], Any], message: str
) -> None:
    aarch64.Arm64MachineState.from_wire(wire)  # the unmodified one is fine
    mutate(wire)
    with pytest.raises(saved_state.StateFormatError, match=message):
        aarch64.Arm64MachineState.from_wire(wire)


def test_state_survives_the_wire_unchanged(wire: dict[str, Any]) -> None:
    state = aarch64.Arm64MachineState.from_wire(wire)
    assert state.to_wire() == wire
    assert state.vcpus[1].mpidr & 0xFF == 1
