"""Put the workload guest on a VM: image, tables and parameters in RAM, registers on each vCPU."""

from __future__ import annotations

from migrated.kvm.vm import Vm

from .layout import MAX_MEMORY
from .workload import WorkloadGuest, WorkloadParams, install, plan_layout


def load_workload(vm: Vm, params: WorkloadParams) -> WorkloadGuest:
    """Install the guest into `vm` (fresh, zeroed RAM; vCPUs not started) and set its vCPUs.

    The guest maps only what its layout covers: a VM larger than the layout's limit keeps the
    rest of its RAM unmapped by the guest (it is still guest RAM, tracked and migrated).
    """
    assert vm.memory is not None
    if params.vcpus != len(vm.vcpus):
        raise ValueError(f"workload for {params.vcpus} vCPUs on a VM with {len(vm.vcpus)}")
    layout = plan_layout(min(vm.memory.size, MAX_MEMORY), params.vcpus, params.working_set_bytes)
    states = install(vm.write_guest, layout, params, vm.tsc_khz())
    for vcpu, (regs, sregs) in zip(vm.vcpus, states):
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
    return WorkloadGuest(layout)
