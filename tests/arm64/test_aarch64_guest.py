"""The arm64 workload guest on a real arm64 KVM: it runs, its pages verify, its LPIs arrive, and
the vGIC's table saves land in the backup bitmap only.

Runs only in the arm64 lane (`make test-arm64`). The guest image is cross-built on the host
(`python -m migrated.guests.build`) before the lane copies the repository in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from helpers import wait_for_status

from migrated.guests.aarch64 import boot as ab
from migrated.guests.aarch64.boot import Arm64VcpuStatus, Arm64WorkloadGuest, ItsSettings
from migrated.guests.workload import GuestPhase, WorkloadParams
from migrated.kvm.arch import aarch64 as arm
from migrated.kvm.system import Kvm
from migrated.kvm.arch import create_vm
from migrated.kvm.vm import Vm, VmConfig

pytestmark = pytest.mark.arm64

MIB = 1 << 20
MEMORY = 64 * MIB
WORKING_SET = 4 * MIB
WAIT_S = 60.0  # everything here runs in software emulation: generous, never a timing assertion


def wait_for(
    guest: Arm64WorkloadGuest,
    vm: Vm,
    what: str,
    done: Callable[[list[Arm64VcpuStatus]], bool],
) -> list[Arm64VcpuStatus]:
    return wait_for_status(lambda: guest.status(vm.ram), vm.vcpus, done, WAIT_S, what)


def settled(status: list[Arm64VcpuStatus]) -> bool:
    """No INT is due or outstanding, and the counts agree. The host reads the status words while
    vCPU 0 runs, one after the other: a read between two of the guest's stores is torn, so the
    wait goes on until one read is whole. A lost LPI stays outstanding, and the wait fails."""
    s = status[0]
    return s.lpi_rate_seen == 0 and s.lpi_outstanding == 0 and s.lpis_received == s.lpis_expected


def no_fault(status: list[Arm64VcpuStatus]) -> None:
    for s in status:
        assert s.fault is None, f"vCPU {s.vcpu} took an exception: {s.fault}"


@pytest.fixture
def running_guest(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Vm, Arm64WorkloadGuest]]:
    vcpus: int = request.param
    with Kvm.open() as kvm, create_vm(kvm, VmConfig(memory_bytes=MEMORY, vcpus=vcpus)) as vm:
        assert vm.dirty_tracking == "ring" and vm.with_bitmap
        guest = ab.load_workload_aarch64(
            vm,
            WorkloadParams(vcpus=vcpus, working_set_bytes=WORKING_SET, dirty_rate_mib_s=16),
            ItsSettings(lpi_rate_hz=200),
        )
        vm.start()
        yield vm, guest


@pytest.mark.parametrize("running_guest", [1, 2], indirect=True, ids=["1vcpu", "2vcpus"])
def test_guest_runs_verifies_pages_and_receives_every_lpi(
    running_guest: tuple[Vm, Arm64WorkloadGuest],
) -> None:
    vm, guest = running_guest
    first = wait_for(
        guest,
        vm,
        "every vCPU started and wrote pages, ITS ready, LPIs received",
        lambda st: (
            all(s.started and s.heartbeat > 0 and s.pages_written > 0 for s in st)
            and st[0].its_state == "ready"
            and st[0].lpis_received >= 5
        ),
    )
    no_fault(first)
    assert all(s.counter_hz >= 1000 for s in first)
    assert [s.mpidr & 0xFF for s in first] == list(range(len(first)))
    later = wait_for(
        guest,
        vm,
        "heartbeats, pages and LPIs rose",
        lambda st: (
            all(s.heartbeat > f.heartbeat and s.pages_written > f.pages_written for s, f in zip(st, first))
            and st[0].lpis_received > first[0].lpis_received
        ),
    )
    assert later[0].its_error is None and later[0].its_commands > 2 + ab.WLA_EVENTS

    # Stop the INTs: whatever is outstanding arrives, and then received == sent, exactly.
    guest.set_lpi_rate(vm.write_guest, 0)
    quiet = wait_for(guest, vm, "every LPI sent received", settled)
    assert quiet[0].lpis_expected > 0
    assert quiet[0].lpis_unexpected == 0 and quiet[0].msis_received == 0

    vm.pause()
    final = guest.status(vm.ram)
    no_fault(final)
    assert all(s.verify_errors == 0 for s in final), final
    assert all(s.state in (GuestPhase.WRITING, GuestPhase.THROTTLED) for s in final)
    report = guest.verify(vm.ram)
    assert report.ok, report
    assert report.pages_written > 0


def table_word(vm: Vm, gpa: int) -> int:
    offset = gpa - ab.RAM_BASE
    return int(vm.ram[offset : offset + 8].view(np.uint64)[0])


@pytest.mark.parametrize("running_guest", [2], indirect=True, ids=["2vcpus"])
def test_its_table_saves_land_in_the_backup_bitmap_not_in_the_rings(
    running_guest: tuple[Vm, Arm64WorkloadGuest],
) -> None:
    vm, guest = running_guest
    layout = guest.layout
    wait_for(guest, vm, "LPIs flowing", lambda st: st[0].lpis_received >= 3)
    # Hold the LPIs: the next INT stays pending, so SAVE_PENDING_TABLES has a bit to write.
    guest.hold_lpis(vm.write_guest, True)
    # Both words in the same read: the status is read while vCPU 0 runs (see `settled`).
    wait_for(
        guest,
        vm,
        "an LPI left pending",
        lambda st: st[0].lpis_expected > st[0].lpis_received and st[0].lpi_outstanding != 0,
    )

    vm.pause()
    assert vm.tracker is not None
    before = vm.tracker.collect()  # the guest's writes so far (R6.2), and the loader's (R5)
    assert before.count > 0
    arm.save_its_tables(vm)  # R6.3: no vCPU runs
    rings = vm.tracker.collect()
    bitmap = vm.tracker.collect_backup_bitmap()  # R6.4
    assert bitmap is not None

    written = {int(p) for p in bitmap.by_slot[0]}
    in_rings = {int(p) for p in rings.by_slot.get(0, np.empty(0, np.uint64))}
    for name in ("its device table", "its collection table", "itt", "lpi pending table"):
        pages = set(guest.pages_of(name))
        assert pages & written, f"{name}: none of its pages is in the backup bitmap"
        assert not pages & in_rings, f"{name}: KVM's save showed up in the dirty rings"
    ws_first = (layout.ws_base - ab.RAM_BASE) // 4096
    assert not [p for p in written if p >= ws_first], "the save wrote into the working set"

    # What KVM wrote is its ABI (arm-vgic-its.rst, ABI revision 0), where the guest put the
    # tables: the DTE of our device, the CTE of collection 0, one ITE per event.
    device = guest.its_device_id(vm.ram)
    dte = table_word(vm, layout.its_device_table + 8 * device)
    assert dte >> 63 == 1 and (dte >> 5 & ((1 << 44) - 1)) << 8 == layout.its_itt
    assert dte & 0x1F == ab.WLA_EVENT_BITS - 1
    cte = table_word(vm, layout.its_collection_table + 8 * ab.WLA_ICID)
    assert cte >> 63 == 1 and cte & 0xFFFF == ab.WLA_ICID and (cte >> 16) & 0xFFFF_FFFF == 0
    for event in range(ab.WLA_EVENTS):
        ite = table_word(vm, layout.its_itt + 8 * event)
        assert (ite >> 16) & 0xFFFF_FFFF == ab.WLA_LPI_BASE + event and ite & 0xFFFF == ab.WLA_ICID
    # The held LPIs' pending bits (vCPU 0's pending table: one bit per INTID).
    pend = vm.ram[layout.lpi_pend - ab.RAM_BASE :][: ab.LPI_PEND_BYTES]
    pending = {i for i in range(8192, 1 << ab.WLA_LPI_ID_BITS) if pend[i // 8] >> (i % 8) & 1}
    outstanding = guest.status(vm.ram)[0].lpi_outstanding
    expected = {ab.WLA_LPI_BASE + e for e in range(ab.WLA_INT_EVENTS) if outstanding >> e & 1}
    # The guest marks an INT outstanding just before it hands the command to the ITS (its.c,
    # send_int): a pause between the two leaves one outstanding event that the ITS never saw.
    assert expected & pending and len(expected - pending) <= 1, (expected, pending)

    # Released, the guest takes every pending LPI: nothing was lost by the save.
    vm.resume()
    guest.set_lpi_rate(vm.write_guest, 0)
    guest.hold_lpis(vm.write_guest, False)
    quiet = wait_for(guest, vm, "held LPIs received", settled)
    assert quiet[0].lpis_unexpected == 0
    no_fault(quiet)


@pytest.mark.parametrize("vcpus", [2])
def test_guest_moves_to_a_fresh_vm_with_its_pending_lpis(vcpus: int) -> None:
    """The downtime and restore of a migration, in one process: R6 on the source (pause, final
    harvest, state, ITS tables, backup bitmap), all RAM into a fresh VM, R9 restore there. The
    guest goes on where it stopped: pages verify, and the LPIs left pending on the source
    (travelling in the LPI pending table and the ITS tables in RAM) arrive on the target."""
    config = VmConfig(memory_bytes=MEMORY, vcpus=vcpus)
    params = WorkloadParams(vcpus=vcpus, working_set_bytes=WORKING_SET, dirty_rate_mib_s=16)
    with Kvm.open() as kvm, create_vm(kvm, config) as source, create_vm(kvm, config) as target:
        guest = ab.load_workload_aarch64(source, params, ItsSettings(lpi_rate_hz=200))
        source.start()
        wait_for(guest, source, "LPIs flowing", lambda st: st[0].lpis_received >= 3)
        guest.hold_lpis(source.write_guest, True)
        wait_for(guest, source, "an LPI left pending", lambda st: st[0].lpis_expected > st[0].lpis_received)

        source.pause()  # R6.1
        assert source.tracker is not None
        source.tracker.collect()  # R6.2
        state = arm.save_vm_state(source)  # R6.3
        arm.save_its_tables(source)
        assert source.tracker.collect_backup_bitmap() is not None  # R6.4
        before = guest.status(source.ram)
        assert before[0].lpi_outstanding != 0

        target.write_guest(ab.RAM_BASE, source.ram)  # all memory first (R9)
        arm.restore_vm_state(target, state)
        target.start()
        after = wait_for(
            guest,
            target,
            "heartbeats and pages go on in the target",
            lambda st: all(s.heartbeat > b.heartbeat and s.pages_written > b.pages_written for s, b in zip(st, before)),
        )
        no_fault(after)
        # Released: the LPIs pending since the source arrive, and INT commands issued in the
        # target (through its restored command queue) arrive after them.
        guest.hold_lpis(target.write_guest, False)
        wait_for(
            guest,
            target,
            "LPIs of INTs sent in the target",
            lambda st: st[0].lpis_received > before[0].lpis_expected + 3,
        )
        guest.set_lpi_rate(target.write_guest, 0)
        quiet = wait_for(guest, target, "every LPI sent received", settled)
        assert (quiet[0].its_state, quiet[0].its_error, quiet[0].lpis_unexpected) == ("ready", None, 0)
        target.pause()
        final = guest.status(target.ram)
        assert all(s.verify_errors == 0 for s in final), final
        report = guest.verify(target.ram)
        assert report.ok, report
