"""The workload guest on real KVM: it boots at CPL3, dirties its working set, verifies it, obeys
rate and mode changes live, and leaves RAM that the host-side checker accepts."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from helpers import wait_for_status

from migrated.guests import abi
from migrated.guests.workload import (
    GuestPhase,
    VcpuStatus,
    WorkloadGuest,
    WorkloadParams,
)
from migrated.guests.x86_64.boot import load_workload
from migrated.kvm.system import Kvm
from migrated.kvm.arch import create_vm
from migrated.kvm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm

MIB = 1 << 20
MEMORY = 64 * MIB
WORKING_SET = 16 * MIB


@contextmanager
def booted(params: WorkloadParams, *, start: bool = True) -> Iterator[tuple[Vm, WorkloadGuest]]:
    with Kvm.open() as kvm, create_vm(kvm, VmConfig(memory_bytes=MEMORY, vcpus=params.vcpus)) as vm:
        guest = load_workload(vm, params)  # the daemon's loader
        if start:
            vm.start()
        yield vm, guest
        vm.pause()
        assert [v.error for v in vm.vcpus] == [None] * params.vcpus
        assert vm.harvester_error is None


def heartbeats(status: list[VcpuStatus]) -> list[int]:
    return [s.heartbeat for s in status]


@pytest.mark.parametrize("vcpus", [1, 2])
def test_guest_runs_dirties_and_verifies(vcpus: int) -> None:
    with booted(WorkloadParams(vcpus=vcpus, working_set_bytes=WORKING_SET)) as (vm, guest):
        first = wait_for_status(lambda: guest.status(vm.ram), vm.vcpus, lambda s: all(x.heartbeat > 0 for x in s), 10.0)
        wait_for_status(
            lambda: guest.status(vm.ram),
            vm.vcpus,
            lambda s: all(b.heartbeat > a.heartbeat for a, b in zip(first, s)),
            10.0,
        )
        # Three sweeps each, so every page was re-verified at least twice by the guest.
        status = wait_for_status(lambda: guest.status(vm.ram), vm.vcpus, lambda s: all(x.sweep > 3 for x in s), 10.0)
        assert all(s.state is GuestPhase.WRITING and s.started for s in status)
        vm.pause()
        status = guest.status(vm.ram)
        assert [s.verify_errors for s in status] == [0] * vcpus
        assert [(s.first_page, s.page_count) for s in status] == [guest.layout.share(v) for v in range(vcpus)]
        report = guest.verify(vm.ram)
        assert report.ok, report
        assert report.pages_written == guest.layout.ws_pages
        assert report.in_flight <= vcpus


def test_guest_stays_correct_across_pause_and_resume() -> None:
    with booted(WorkloadParams(vcpus=2, working_set_bytes=WORKING_SET)) as (vm, guest):
        for _ in range(5):
            wait_for_status(lambda: guest.status(vm.ram), vm.vcpus, lambda s: all(x.pages_written > 0 for x in s), 10.0)
            time.sleep(0.05)
            vm.pause()
            report = guest.verify(vm.ram)
            assert report.ok, report
            written = [s.pages_written for s in guest.status(vm.ram)]
            vm.resume()
            wait_for_status(
                lambda: guest.status(vm.ram),
                vm.vcpus,
                lambda s, written=written: all(x.pages_written > w for x, w in zip(s, written)),
                10.0,
            )
        assert [s.verify_errors for s in guest.status(vm.ram)] == [0, 0]


def test_rate_zero_idles_with_heartbeats_and_rates_change_live() -> None:
    params = WorkloadParams(vcpus=2, working_set_bytes=WORKING_SET, dirty_rate_mib_s=0)
    with booted(params) as (vm, guest):
        first = wait_for_status(lambda: guest.status(vm.ram), vm.vcpus, lambda s: all(x.heartbeat > 0 for x in s), 10.0)
        status = wait_for_status(
            lambda: guest.status(vm.ram),
            vm.vcpus,
            lambda s: all(b.heartbeat > a.heartbeat + 50 for a, b in zip(first, s)),
            10.0,
        )
        assert [s.pages_written for s in status] == [0, 0]
        assert all(s.state is GuestPhase.IDLE for s in status)

        guest.set_rate(vm.write_guest, 4)  # 1024 pages/s in all, 512 per vCPU
        t0 = time.monotonic()
        start = wait_for_status(
            lambda: guest.status(vm.ram), vm.vcpus, lambda s: all(x.rate_seen == 512 for x in s), 10.0
        )
        end = wait_for_status(
            lambda: guest.status(vm.ram),
            vm.vcpus,
            lambda s, start=start: all(b.pages_written > a.pages_written + 50 for a, b in zip(start, s)),
            10.0,
        )
        elapsed = time.monotonic() - t0
        for a, b in zip(start, end):
            assert 0 < b.pages_written - a.pages_written <= 512 * elapsed + 512 // 100 + 2
            assert b.state in (GuestPhase.THROTTLED, GuestPhase.WRITING)

        guest.set_rate(vm.write_guest, math.inf)
        wait_for_status(
            lambda: guest.status(vm.ram), vm.vcpus, lambda s: all(x.pages_written > 4 * 4096 for x in s), 10.0
        )
        guest.set_rate(vm.write_guest, 0)
        status = wait_for_status(
            lambda: guest.status(vm.ram), vm.vcpus, lambda s: all(x.state is GuestPhase.IDLE for x in s), 10.0
        )
        # The witness that the guest ran meanwhile (and would have written, if it wrongly did).
        later = wait_for_status(
            lambda: guest.status(vm.ram),
            vm.vcpus,
            lambda s: all(b.heartbeat > a.heartbeat + 20 for a, b in zip(status, s)),
            10.0,
        )
        assert [s.pages_written for s in later] == [s.pages_written for s in status]
        vm.pause()
        assert guest.verify(vm.ram).ok


@pytest.mark.parametrize("vcpus", [1, 2])
def test_passes_mode_writes_exactly_one_pass_per_request(vcpus: int) -> None:
    params = WorkloadParams(vcpus=vcpus, working_set_bytes=WORKING_SET, mode="passes")
    with booted(params) as (vm, guest):
        layout = guest.layout
        shares = [layout.share(v)[1] for v in range(vcpus)]
        status = wait_for_status(
            lambda: guest.status(vm.ram), vm.vcpus, lambda s: all(x.state is GuestPhase.PASS_WAIT for x in s), 10.0
        )
        assert [s.pages_written for s in status] == [0] * vcpus
        for n in (1, 2, 3):
            assert guest.request_pass(vm.write_guest, vm.ram) == n
            wait_for_status(
                lambda: guest.status(vm.ram), vm.vcpus, lambda s, n=n: all(x.passes_done == n for x in s), 10.0
            )
            waiting = wait_for_status(
                lambda: guest.status(vm.ram), vm.vcpus, lambda s: all(x.state is GuestPhase.PASS_WAIT for x in s), 10.0
            )
            # Heartbeats are the witness that it ran long enough to write more, if it wrongly would.
            wait_for_status(
                lambda: guest.status(vm.ram),
                vm.vcpus,
                lambda s, w=waiting: all(b.heartbeat > a.heartbeat + 20 for a, b in zip(w, s)),
                10.0,
            )
            status = guest.status(vm.ram)
            assert guest.passes_done(vm.ram) == [n] * vcpus
            assert [s.pages_written for s in status] == [n * c for c in shares]
            vm.pause()
            gens = vm.ram[layout.gen : layout.gen + 4 * layout.ws_pages].view(np.uint32)
            assert np.all(gens == n)
            report = guest.verify(vm.ram)
            assert report.ok and report.in_flight == 0, report
            vm.resume()
        assert [s.verify_errors for s in guest.status(vm.ram)] == [0] * vcpus


def test_install_marks_its_writes_dirty() -> None:
    """R5: the loader's writes reach the tracker as the daemon's own dirty pages."""
    with booted(WorkloadParams(vcpus=2, working_set_bytes=WORKING_SET), start=False) as (vm, guest):
        assert vm.tracker is not None
        dirty = set(int(p) for p in vm.tracker.collect().by_slot[0])
        layout = guest.layout
        lm = layout.longmode
        expected = {lm.pml4, lm.pdpt, lm.pd, lm.gdt, lm.tss, layout.code, layout.params}
        assert {gpa // 4096 for gpa in expected} <= dirty
        vm.start()


def test_guest_reports_bad_parameters_instead_of_running() -> None:
    params = WorkloadParams(vcpus=1, working_set_bytes=WORKING_SET)
    with booted(params, start=False) as (vm, guest):
        word = guest.layout.params + 8 * abi.WL_P_VERSION
        vm.write_guest(word, (abi.WL_VERSION + 1).to_bytes(8, "little"))
        vm.start()
        status = wait_for_status(lambda: guest.status(vm.ram), vm.vcpus, lambda s: s[0].heartbeat > 10, 10.0)
        assert status[0].state is GuestPhase.BAD_PARAMS and status[0].pages_written == 0
