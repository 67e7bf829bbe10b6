"""Put the workload guest on a VM: image, tables and parameters in RAM, registers on each vCPU."""

from __future__ import annotations

from migrated.kvm import uapi
from migrated.kvm.arch.x86_64 import set_xcr0
from migrated.kvm.system import Kvm
from migrated.kvm.vm import Vm

from ..layout import MAX_MEMORY
from ..workload import WorkloadGuest, WorkloadParams, install, plan_layout


def load_workload(vm: Vm, params: WorkloadParams) -> WorkloadGuest:
    """Install the guest into `vm` (fresh, zeroed RAM; vCPUs not started) and set its vCPUs.

    The guest maps only what its layout covers: a VM larger than the layout's limit keeps the
    rest of its RAM unmapped by the guest (it is still guest RAM, tracked and migrated).
    """
    assert vm.memory is not None
    if params.vcpus != len(vm.vcpus):
        raise ValueError(f"workload for {params.vcpus} vCPUs on a VM with {len(vm.vcpus)}")
    layout = plan_layout(
        min(vm.memory.size, MAX_MEMORY),
        params.vcpus,
        params.working_set_bytes,
        smallos=params.smallos,
    )
    states = install(vm.write_guest, layout, params, vm.tsc_khz())
    for vcpu, (regs, sregs) in zip(vm.vcpus, states):
        if params.smallos:
            # XCR0 before CR4.OSXSAVE is relied on; the guest cannot `xsetbv` at CPL0 on PVM.
            set_xcr0(vcpu, smallos_xcr0(vm.kvm))
            if vcpu.index:  # with the in-kernel irqchip, APs start UNINITIALIZED
                vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
    return WorkloadGuest(layout)


# ---- the small OS's VMM side (abi_smallos.h) -------------------------------------------

XCR0_X87, XCR0_SSE, XCR0_AVX, XCR0_AVX512 = 0x1, 0x2, 0x4, 0xE0


def smallos_xcr0(kvm: Kvm) -> int:
    """The XCR0 the small OS runs with: x87 | SSE, plus AVX and AVX-512 (0xe7) where this KVM
    supports them (KVM_GET_SUPPORTED_CPUID leaf 0xD, sub-leaf 0)."""
    supported = 0
    for entry in kvm.supported_cpuid():
        if entry.function == 0xD and entry.index == 0:
            supported = entry.eax | entry.edx << 32
    xcr0 = XCR0_X87 | XCR0_SSE
    if supported & XCR0_AVX:
        xcr0 |= XCR0_AVX
        if supported & XCR0_AVX512 == XCR0_AVX512:
            xcr0 |= XCR0_AVX512
    return xcr0


def irq_line(vm: Vm, irq: int, level: int) -> None:
    """KVM_IRQ_LINE: set a GSI of the in-kernel irqchip (PIC and IOAPIC pin `irq`) to `level`."""
    vm.irq_line(irq, level)


def pulse_irq(vm: Vm, irq: int = 4) -> None:
    """An edge on `irq`: what a device raising and dropping its line does (the small OS counts
    it on vCPU 0 when `irq` is its WorkloadParams.irq_pin)."""
    irq_line(vm, irq, 1)
    irq_line(vm, irq, 0)
