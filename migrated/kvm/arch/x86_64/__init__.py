"""x86_64: everything that differs on this architecture, behind one name.

- `machine.py`: how an x86 VM is built (the VmArch hooks `Vm.create` calls).
- `cpu.py`: MSRs, CPUID, XSAVE size, TSC frequency, the CPU model of a saved state.
- `devices.py`: the in-kernel PIC, IOAPIC and PIT.
- `fixed.py`: what of the host, a VM or a vCPU cannot change while the guest runs, read once.
- `state.py`: the complete machine state, saved and restored in the order KVM accepts (R9).
- `uapi.py`: the x86-only KVM numbers and structs (the common ones are in `migrated/kvm/uapi.py`).
"""

from .machine import X86_64 as X86_64
from .cpu import MAX_CPUID_ENTRIES as MAX_CPUID_ENTRIES
from .cpu import MSR_IA32_TSC as MSR_IA32_TSC
from .cpu import MSR_IA32_TSC_DEADLINE as MSR_IA32_TSC_DEADLINE
from .cpu import MSR_NAMES as MSR_NAMES
from .cpu import msr_name as msr_name
from .cpu import CpuModel as CpuModel
from .cpu import cpu_identity as cpu_identity
from .cpu import xsave2_size as xsave2_size
from .cpu import get_msrs as get_msrs
from .cpu import set_msrs as set_msrs
from .cpu import restore_msr_order as restore_msr_order
from .cpu import get_cpuid as get_cpuid
from .cpu import get_cpuid_bytes as get_cpuid_bytes
from .cpu import cpuid_buffer_of as cpuid_buffer_of
from .cpu import read_tsc_khz as read_tsc_khz
from .cpu import set_xcr0 as set_xcr0
from .devices import create_irqchip as create_irqchip
from .fixed import HostFacts as HostFacts
from .fixed import host_facts as host_facts
from .fixed import cpuid_of as cpuid_of
from .fixed import set_cpuid as set_cpuid
from .devices import create_pit2 as create_pit2
from .devices import detect_devices as detect_devices
from .devices import check_devices as check_devices
from .state import MAX_VCPUS as MAX_VCPUS
from .state import MAX_MSRS as MAX_MSRS
from .statebuffers import MIN_XSAVE_BYTES as MIN_XSAVE_BYTES
from .state import MAX_XSAVE_BYTES as MAX_XSAVE_BYTES
from .state import X86_MP_STATES as X86_MP_STATES
from .statebuffers import IRQCHIP_IDS as IRQCHIP_IDS
from .state import X86VcpuState as X86VcpuState
from .state import X86MachineState as X86MachineState
from .state import save_vcpu_state as save_vcpu_state
from .state import save_vm_state as save_vm_state
from .state import check_compatible as check_compatible
from .state import restore_vcpu_state as restore_vcpu_state
from .state import restore_vm_state as restore_vm_state
