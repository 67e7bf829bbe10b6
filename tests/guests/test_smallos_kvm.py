"""The x86 small-OS guest on real KVM (in-kernel irqchip and PIT): a CPL0 kernel with the LAPIC
timer, IPIs, an IOAPIC IRQ pulsed by the VMM, the PIT and kvmclock under the CPL3 workload, which
re-checks x87/SSE/AVX/AVX-512 registers, MXCSR, FS base, kvmclock and lock-xadd counters; every
check counted in the status pages. Also: a full state round trip into a second VM, and a restore
that leaves a piece of state out, which the guest's checks catch."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import wait_for_status

from migrated.guests import abi
from migrated.guests.x86_64.boot import load_workload, pulse_irq
from migrated.guests.workload import SmallOsStatus, WorkloadGuest, WorkloadParams, X86VcpuStatus
from migrated.kvm.arch import x86_64
from migrated.kvm.memory import GuestMemory
from migrated.kvm.system import Kvm
from migrated.kvm.vcpu import ensure_kick_handler
from migrated.kvm.arch import host_arch
from migrated.kvm.vm import Vm

MIB = 1 << 20
MEMORY = 64 * MIB
WORKING_SET = 8 * MIB
TICK_HZ = 250
PIT_HZ = 100
HEADER = Path(__file__).resolve().parents[2] / "migrated/guests/x86_64/abi_smallos.h"


def test_abi_header_matches_python() -> None:
    in_c = {
        name: int(value, 0)
        for name, value in re.findall(r"^#define (WLX_\w+) (0x[0-9a-fA-F]+|\d+)\b", HEADER.read_text(), re.M)
    }
    assert in_c == abi.smallos_constants()


def build_vm(kvm: Kvm, vcpus: int, name: str) -> Vm:
    """The VM the brief prescribes: ring, flat RAM, in-kernel irqchip and PIT, then vCPUs."""
    ensure_kick_handler()
    vm = Vm(kvm, kvm.caps(), host_arch(), name)
    try:
        vm.enable_dirty_ring(1 << 20)
        vm.add_memory(GuestMemory.flat(MEMORY, name=f"{name}-ram"))
        x86_64.create_irqchip(vm)
        x86_64.create_pit2(vm)
        for i in range(vcpus):
            vm.create_vcpu(i)
        vm.finish_setup()
    except BaseException:
        vm.close()
        raise
    return vm


def params(vcpus: int, **kw: object) -> WorkloadParams:
    return WorkloadParams(
        vcpus=vcpus,
        working_set_bytes=WORKING_SET,
        dirty_rate_mib_s=64,
        smallos=True,
        tick_hz=TICK_HZ,
        pit_hz=PIT_HZ,
        **kw,  # type: ignore[arg-type]
    )


@contextmanager
def booted(vcpus: int) -> Iterator[tuple[Kvm, Vm, WorkloadGuest]]:
    with Kvm.open() as kvm, build_vm(kvm, vcpus, "src") as vm:
        guest = load_workload(vm, params(vcpus))
        vm.start()
        yield kvm, vm, guest
        vm.pause()


def so(status: list[X86VcpuStatus]) -> list[SmallOsStatus]:
    out = [s.smallos for s in status]
    assert all(x is not None for x in out)
    return out  # type: ignore[return-value]


def assert_clean(vm: Vm, guest: WorkloadGuest) -> None:
    status = guest.status(vm.ram)
    for s in status:
        assert s.smallos is not None
        assert s.smallos.errors == {}, (s.vcpu, s.smallos)
        assert s.verify_errors == 0, s
    own = sum(s.smallos.atomic_own for s in status if s.smallos)
    shared = status[0].smallos.atomic_shared if status[0].smallos else 0
    assert 0 <= own - shared <= len(status), (own, shared)  # one increment in flight per vCPU


def check_moving(vm: Vm, guest: WorkloadGuest, vcpus: int) -> None:
    """Over half a second: ticks near the rate, IPIs on the others, the PIT, injected IRQs,
    and every CPL3 check running."""
    a = so(guest.status(vm.ram))
    t0 = time.monotonic()
    # One pulse at a time, each counted before the next: two pulses the guest has not yet taken
    # would merge into one (an edge), which says nothing about the guest.
    for n in range(1, 11):
        pulse_irq(vm, 4)
        wait_for_status(lambda: so(guest.status(vm.ram)), vm.vcpus, lambda s, n=n: s[0].irqs >= a[0].irqs + n, 10.0)
    b = wait_for_status(
        lambda: so(guest.status(vm.ram)),
        vm.vcpus,
        lambda s: (
            all(
                y.ticks >= x.ticks + 10
                and y.reg_checks > x.reg_checks
                and y.clock_reads > x.clock_reads
                and y.msr_checks > x.msr_checks
                and y.atomic_checks > x.atomic_checks
                for x, y in zip(a, s)
            )
            and s[0].pit_ticks >= a[0].pit_ticks + 5
            and all(s[v].ipis > a[v].ipis for v in range(1, vcpus))
        ),
        10.0,
    )
    elapsed = time.monotonic() - t0
    assert b[0].irqs == a[0].irqs + 10
    # Only upper bounds against the clock: a loaded host may run the guest late, never early.
    # The rates themselves are measured by bench/state.py.
    for x, y in zip(a, b):
        ticks = y.ticks - x.ticks
        assert ticks < 1.5 * TICK_HZ * elapsed + 5, (ticks, elapsed)
    pit = b[0].pit_ticks - a[0].pit_ticks
    assert pit < 1.5 * PIT_HZ * elapsed + 5, (pit, elapsed)
    for v in range(1, vcpus):
        assert b[v].ipis > a[v].ipis
    assert b[0].ipis == 0


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_small_os_runs_and_stays_clean(vcpus: int) -> None:
    with booted(vcpus) as (_, vm, guest):
        status = wait_for_status(
            lambda: so(guest.status(vm.ram)),
            vm.vcpus,
            lambda s: all(x.kstate == abi.WLX_K_USER and x.reg_checks > 5 for x in s),
            10.0,
        )
        assert all(s.features & abi.WLX_FEAT_KVMCLOCK for s in status)
        check_moving(vm, guest, vcpus)
        vm.pause()
        assert_clean(vm, guest)
        report = guest.verify(vm.ram)
        assert report.ok, report


def migrate_into_new_vm(kvm: Kvm, vm: Vm, vcpus: int, drop: str | None = None) -> Vm:
    """Pause, save the complete state, copy RAM, restore into a VM built the same way.
    `drop`: leave one piece out ("xsave": zeroed; "lapic": not restored)."""
    vm.pause()
    state = x86_64.save_vm_state(vm, irqchip=True, pit=True)
    if drop == "xsave":
        state = replace(state, vcpus=tuple(replace(v, xsave=bytes(len(v.xsave))) for v in state.vcpus))
    elif drop == "lapic":
        state = replace(state, vcpus=tuple(replace(v, lapic=b"") for v in state.vcpus))
    target = build_vm(kvm, vcpus, "dst")
    try:
        target.ram[:] = vm.ram
        x86_64.restore_vm_state(target, state, irqchip=True, pit=True)
    except BaseException:
        target.close()
        raise
    return target


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_small_os_survives_a_full_state_round_trip(vcpus: int) -> None:
    with booted(vcpus) as (kvm, vm, guest):
        wait_for_status(lambda: so(guest.status(vm.ram)), vm.vcpus, lambda s: all(x.reg_checks > 20 for x in s), 10.0)
        before = so(guest.status(vm.ram))
        with migrate_into_new_vm(kvm, vm, vcpus) as target:
            target.start()
            after = wait_for_status(
                lambda: so(guest.status(target.ram)),
                target.vcpus,
                lambda s: all(b.reg_checks > a.reg_checks + 20 and b.ticks > a.ticks + 5 for a, b in zip(before, s)),
                10.0,
            )
            assert all(b.clock_ns >= a.clock_ns for a, b in zip(before, after))
            check_moving(target, guest, vcpus)
            target.pause()
            assert_clean(target, guest)
            report = guest.verify(target.ram)
            assert report.ok, report
            assert [v.error for v in target.vcpus] == [None] * vcpus


@pytest.mark.kvm
@pytest.mark.parametrize("drop", ["xsave", "lapic"])
def test_small_os_catches_a_restore_that_leaves_state_out(drop: str) -> None:
    vcpus = 2
    with booted(vcpus) as (kvm, vm, guest):
        wait_for_status(lambda: so(guest.status(vm.ram)), vm.vcpus, lambda s: all(x.reg_checks > 20 for x in s), 10.0)
        before = so(guest.status(vm.ram))
        assert all(x.reg_mismatches == 0 for x in before)
        with migrate_into_new_vm(kvm, vm, vcpus, drop=drop) as target:
            target.start()
            # The CPL3 checks go on either way (heartbeat-driven): wait for 50 more of each.
            after = wait_for_status(
                lambda: so(guest.status(target.ram)),
                target.vcpus,
                lambda s: all(b.reg_checks > a.reg_checks + 50 for a, b in zip(before, s)),
                10.0,
            )
            if drop == "xsave":
                # Every vCPU's first check after the restore finds its registers gone.
                assert all(x.reg_mismatches >= 1 for x in after), after
                assert all(x.reg_bad_mask & (abi.WLX_R_ZMM | abi.WLX_R_MXCSR) for x in after)
            else:
                # No LAPIC state: timers, ticks and IPIs stop (and the guest can tell). The witness
                # that the guest had time to take ticks: its CPL3 checks went on meanwhile.
                later = wait_for_status(
                    lambda: so(guest.status(target.ram)),
                    target.vcpus,
                    lambda s: all(y.reg_checks > x.reg_checks + 200 for x, y in zip(after, s)),
                    10.0,
                )
                assert [x.ticks for x in later] == [x.ticks for x in after], (after, later)
                assert later[1].ipis == after[1].ipis
            target.pause()
