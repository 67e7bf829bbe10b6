"""Per-vCPU throttle on real KVM: a hold keeps one vCPU out of KVM_RUN while the others run, the
rings count each vCPU's writes apart, and a pause or a lift behaves with holds in force."""

from __future__ import annotations

import math

import pytest

from helpers import wait_for
from migrated.guests.workload import WorkloadGuest
from migrated.kvm.errors import VmConfigError
from migrated.kvm.vcpu import VcpuRunState
from migrated.kvm.vm import Vm

from test_dirty_tracking import workload_vm

pytestmark = pytest.mark.kvm


def _written(vm: Vm, guest: WorkloadGuest) -> list[int]:
    return [s.pages_written for s in guest.status(vm.ram)]


def _healthy(vm: Vm) -> None:
    errors = [v.error for v in vm.vcpus if v.error is not None]
    assert not errors and vm.harvester_error is None, (errors, vm.harvester_error)


def test_held_vcpu_is_slowed_and_the_other_is_not() -> None:
    """vCPU 0 held 90% of every period, vCPU 1 free: over the same stretch vCPU 0 writes far
    less, and its ring says so (the per-vCPU counts a dirty limit measures)."""
    # 64 MiB: 8,192 pages a vCPU, so a short stretch's writes are distinct pages.
    with workload_vm(2, "ring", working_set=64 << 20, memory=128 << 20) as (vm, guest):
        assert vm.tracker is not None
        guest.set_rate(vm.write_guest, math.inf)
        vm.start()
        wait_for(lambda: min(_written(vm, guest)) > 4096, what="both vCPUs writing", healthy=lambda: _healthy(vm))
        vm.set_vcpu_throttle([0.9, 0.0])
        assert vm.vcpu_throttle_shares == (0.9, 0.0) and vm.throttle_share == 0.9
        before = _written(vm, guest)
        # A stretch measured in vCPU 1's own work, not in seconds: a busy host stretches both.
        wait_for(
            lambda: _written(vm, guest)[1] - before[1] > 40_000,
            60.0,
            "vCPU 1 to write 40,000 pages",
            healthy=lambda: _healthy(vm),
        )
        after = _written(vm, guest)
        held, free = after[0] - before[0], after[1] - before[1]
        assert 0 < held < free / 2, f"held vCPU wrote {held} pages, the free one {free}"
        # The rings tell the vCPUs apart: over a stretch shorter than a sweep of vCPU 1's share.
        vm.tracker.collect()
        assert vm.tracker.pages_by_vcpu == {}, "counted only when asked (it costs a second dedup)"
        vm.tracker.count_pages_by_vcpu = True
        vm.tracker.collect()
        start = _written(vm, guest)[1]
        wait_for(lambda: _written(vm, guest)[1] - start > 4000, 60.0, "4,000 pages", healthy=lambda: _healthy(vm))
        vm.tracker.collect()
        pages = dict(vm.tracker.pages_by_vcpu)
        assert pages.get(1, 0) > 2 * pages.get(0, 0) > 0, f"distinct pages by vCPU: {pages}"
        assert pages[1] >= 4000, f"vCPU 1 wrote over 4,000 distinct pages; its ring says {pages[1]}"
        vm.set_vcpu_throttle([0.0, 0.0])
        assert vm.vcpu_throttle_shares == (0.0, 0.0) and vm.throttle_share == 0.0
        lifted = _written(vm, guest)
        wait_for(
            lambda: _written(vm, guest)[0] > lifted[0] + 40_000,
            60.0,
            "vCPU 0 to run free again",
            healthy=lambda: _healthy(vm),
        )


def test_pause_with_holds_in_force_and_lifting_them_does_not_resume() -> None:
    """A held vCPU answers pause() (it is parked already); lifting the holds afterwards leaves
    every vCPU parked, and only resume() runs them again."""
    with workload_vm(2, "ring", working_set=16 << 20) as (vm, guest):
        guest.set_rate(vm.write_guest, math.inf)
        vm.start()
        wait_for(lambda: min(_written(vm, guest)) > 0, what="both vCPUs writing", healthy=lambda: _healthy(vm))
        vm.set_vcpu_throttle([0.99, 0.99])
        vm.pause()  # raises VcpuError if a vCPU does not park within its pause timeout
        vm.set_vcpu_throttle([0.0, 0.0])
        assert [v.state for v in vm.vcpus] == [VcpuRunState.PAUSED] * 2 and not vm.running
        parked = _written(vm, guest)
        # A vCPU that ran after the lift would move its count (the guest writes all the time):
        # give the threads the harvester's next 100 polls to misbehave, then look again.
        assert vm.tracker is not None
        polls = vm.tracker.stats.polls
        wait_for(lambda: vm.tracker is not None and vm.tracker.stats.polls > polls + 100, what="100 more harvests")
        assert _written(vm, guest) == parked and not vm.running
        vm.resume()
        wait_for(
            lambda: min(a - b for a, b in zip(_written(vm, guest), parked, strict=True)) > 1000,
            what="both vCPUs to run after resume()",
            healthy=lambda: _healthy(vm),
        )
        vm.pause()
        assert guest.verify(vm.ram).ok


def test_throttle_shares_are_checked() -> None:
    with workload_vm(2, "ring", working_set=4 << 20) as (vm, _guest):
        vm.start()
        with pytest.raises(VmConfigError, match="1 throttle shares for 2 vCPUs"):
            vm.set_vcpu_throttle([0.5])
        with pytest.raises(VmConfigError, match="vCPU 1: throttle share 1.0"):
            vm.set_vcpu_throttle([0.0, 1.0])
        vm.set_throttle(0.5)  # the whole-VM throttle: the same share for every vCPU
        assert vm.vcpu_throttle_shares == (0.5, 0.5)
        vm.set_throttle(0.0)
        assert vm.vcpu_throttle_shares == (0.0, 0.0)
