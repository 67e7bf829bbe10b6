"""What a state save or restore needs of a host, a VM or a vCPU that cannot change while the
guest runs: read once, outside the downtime, and reused by every save and restore after.

- The host's CPU identity, MSR index list and in-kernel device capabilities: properties of the
  host's KVM module (`KVM_GET_SUPPORTED_CPUID`, `KVM_GET_MSR_INDEX_LIST`, `KVM_CHECK_EXTENSION`
  on /dev/kvm), the same for the life of the process.
- A VM's XSAVE size: `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` on the VM fd. api.rst: "The
  KVM_CHECK_EXTENSION ioctl returns the size of the buffer" to use with KVM_GET_XSAVE2, fixed by
  the features the VM may use.
- A vCPU's CPUID, as KVM_GET_CPUID2 reads it right after this process set it (`set_cpuid`),
  before the first KVM_RUN. api.rst (KVM_SET_CPUID2): "Using KVM_SET_CPUID{,2} after KVM_RUN,
  i.e. changing the guest vCPU model after running the guest, may cause guest instability";
  since Linux 5.16 KVM refuses a table after KVM_RUN unless "the supplied CPUID data is equal to
  what was previously set" (commit c6617c61e8fe). After that read, the table changes only in the
  bits KVM updates at run time from the vCPU's registers (OSXSAVE and OSPKE from CR4, leaf 0xD's
  sizes from XCR0 and XSS), which KVM_SET_CPUID2 recomputes from the target's registers anyway,
  and which its equality check leaves out: the table read before the first run is the whole of
  what the target needs. Read back, not kept as passed: KVM stores another table than the one
  it is given (on this PVM host, leaves 1, 7 and 0xD come back with the host's bits), the
  equality check compares with what KVM stored, and setting what KVM reads back gives it back
  unchanged (measured here).

- A target vCPU's TSC frequency, read when it is built (`read_build_tsc_khz`): KVM sets it at
  KVM_CREATE_VCPU, and only KVM_SET_TSC_KHZ changes it, which this process issues in the restore
  alone (`note_tsc_khz`). The restore compares with it instead of asking KVM in the downtime. A
  source still reads its own in the save: api.rst (KVM_GET_TSC_KHZ) "If the host has unstable
  tsc this ioctl returns -EIO instead", and the host can find its TSC unstable while the guest
  runs; the state then says 0 and the target keeps its own frequency, as before.
- A target vCPU's MSRs that KVM refuses to set from userspace, with the values they hold, probed
  when it is built (`read_build_refused_msrs`): KVM_SET_MSRS of the values it holds, which stops
  at each MSR it refuses. Such an MSR keeps the value it has: KVM refuses it on the guest's writes
  too (e.g. MSR_KVM_ASYNC_PF_INT without an in-kernel LAPIC: `kvm_pv_enable_async_pf_int` needs
  one; a PV MSR whose feature the guest's CPUID lacks, `guest_pv_has`), and the vCPU does not run
  before its restore. A state that carries the same value needs no write there, and the restore
  leaves it out of its KVM_SET_MSRS (flatstate.py) rather than stop at it and finish in Python:
  0.18 ms of the downtime measured for the boot-sector guest, on every restore.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

from ... import uapi
from ...errors import KvmError
from ...system import Kvm
from ...vcpu import Vcpu
from ...vm import Vm
from . import uapi as x86_uapi
from .cpu import (
    MSR_IA32_TSC,
    CpuModel,
    cpu_identity,
    get_cpuid_bytes,
    get_msrs,
    read_tsc_khz,
    restore_msr_order,
    set_msrs,
    xsave2_size,
)

_CPUID2_HEADER_BYTES = ctypes.sizeof(uapi.kvm_cpuid2)
LEGACY_XSAVE_BYTES = ctypes.sizeof(x86_uapi.kvm_xsave)  # 4096: what KVM_GET_XSAVE fills


@dataclass(frozen=True)
class HostFacts:
    """This host's KVM as a machine state needs it; `host_facts` reads it once per /dev/kvm fd."""

    cpu_vendor: bytes  # CPUID leaf 0 (EBX, EDX, ECX) of the supported CPUID
    cpu_signature: int  # CPUID leaf 1 EAX
    # KVM_GET_MSR_INDEX_LIST in the order a restore writes them (`restore_msr_order`): a save
    # reads them so, and a flat state's MSRs go back to KVM as they came (flatstate.py).
    msr_indices: tuple[int, ...]
    known_msrs: frozenset[int]
    xsave_bytes: int  # KVM_CAP_XSAVE2 of /dev/kvm, at least 4096 (the legacy struct kvm_xsave)
    irqchip: bool  # KVM_CAP_IRQCHIP
    pit_state2: bool  # KVM_CAP_PIT_STATE2

    @property
    def cpu_model(self) -> CpuModel:
        return CpuModel.from_cpuid(self.cpu_vendor, self.cpu_signature)


_HOSTS: weakref.WeakKeyDictionary[Kvm, HostFacts] = weakref.WeakKeyDictionary()
_XSAVE2: weakref.WeakKeyDictionary[Vm, int] = weakref.WeakKeyDictionary()
# vCPU -> (the Vcpu.cpuid_set it belongs to, the entries KVM_GET_CPUID2 read back after it)
# and those entries back to back (`cpuid_table_of`)
_CPUIDS: weakref.WeakKeyDictionary[Vcpu, tuple[bytes, tuple[bytes, ...], bytes]] = weakref.WeakKeyDictionary()


def host_facts(kvm: Kvm) -> HostFacts:
    known = _HOSTS.get(kvm)
    if known is None:
        vendor, signature = cpu_identity(kvm.supported_cpuid())
        indices = tuple(index for index, _ in restore_msr_order([(i, 0) for i in kvm.msr_index_list()]))
        known = HostFacts(
            cpu_vendor=vendor,
            cpu_signature=signature,
            msr_indices=indices,
            known_msrs=frozenset(indices),
            xsave_bytes=max(xsave2_size(kvm.fd), LEGACY_XSAVE_BYTES),
            irqchip=kvm.check_extension(x86_uapi.KVM_CAP_IRQCHIP) > 0,
            pit_state2=kvm.check_extension(x86_uapi.KVM_CAP_PIT_STATE2) > 0,
        )
        _HOSTS[kvm] = known
    return known


_TSC_KHZ: weakref.WeakKeyDictionary[Vcpu, int] = weakref.WeakKeyDictionary()


def read_build_tsc_khz(vcpu: Vcpu) -> None:
    """At the build: the vCPU's TSC frequency as KVM set it (0: the host's TSC is unstable)."""
    _TSC_KHZ[vcpu] = read_tsc_khz(vcpu)


def note_tsc_khz(vcpu: Vcpu, khz: int) -> None:
    """After KVM_SET_TSC_KHZ took `khz`."""
    _TSC_KHZ[vcpu] = khz


def tsc_khz_of(vcpu: Vcpu) -> int:
    """The vCPU's TSC frequency: as read at the build or set since, else asked of KVM now."""
    known = _TSC_KHZ.get(vcpu)
    return known if known is not None else read_tsc_khz(vcpu)


_REFUSED_MSRS: weakref.WeakKeyDictionary[Vcpu, tuple[tuple[int, int], ...]] = weakref.WeakKeyDictionary()


def read_build_refused_msrs(vcpu: Vcpu, indices: tuple[int, ...]) -> None:
    """At a target's build, before the vCPU ever ran: which of `indices` KVM refuses to set, and
    the values they hold (module docstring). IA32_TSC is left out: a write of the value read a
    moment ago would set the guest's TSC back by the time between, and KVM takes it anyway.
    A probe KVM fails leaves nothing known (the restore then meets each refusal as it comes):
    a build does not fail for what only spares the restore some work."""
    try:
        # Each MSR written with the value it holds: what `set_msrs` returns, the MSRs KVM
        # refused although they hold the value asked for, is every MSR it refuses.
        held = dict(get_msrs(vcpu, [index for index in indices if index != MSR_IA32_TSC]))
        refused = {index: held[index] for index in set_msrs(vcpu, list(held.items()))}
    except KvmError:
        refused = {}
    _REFUSED_MSRS[vcpu] = tuple(refused.items())


def refused_msrs_of(vcpu: Vcpu) -> tuple[tuple[int, int], ...]:
    """(MSR index, the value it holds) for each MSR KVM refused at the build (empty: none, or
    not probed; the restore then finds a refusal as it happens)."""
    return _REFUSED_MSRS.get(vcpu, ())


def vm_xsave2_bytes(vm: Vm) -> int:
    """KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) of the VM fd (0: no KVM_GET_XSAVE2), once per VM."""
    size = _XSAVE2.get(vm)
    if size is None:
        size = _XSAVE2[vm] = xsave2_size(vm.fd)
    return size


def set_cpuid(vcpu: Vcpu, table: ctypes.Array[ctypes.c_uint8], read_back: bool = True) -> None:
    """KVM_SET_CPUID2, and (`read_back`) the table KVM keeps, read now, before the vCPU runs, for
    every state save of this vCPU (`cpuid_of`). Without `read_back` each save reads it."""
    vcpu.set_cpuid(table)
    raw = vcpu.cpuid_set
    if read_back and raw is not None:
        entries = get_cpuid_bytes(vcpu)
        _CPUIDS[vcpu] = (raw, entries, b"".join(entries))
    else:
        _CPUIDS.pop(vcpu, None)


def cpuid_of(vcpu: Vcpu) -> tuple[bytes, ...] | None:
    """The vCPU's CPUID entries (raw struct kvm_cpuid_entry2 each) as read back after its last
    `set_cpuid`; None when not read then, or when its table was set another way since."""
    known = _CPUIDS.get(vcpu)
    if known is None or known[0] is not vcpu.cpuid_set:
        return None
    return known[1]


def cpuid_table_of(vcpu: Vcpu) -> bytes:
    """The vCPU's CPUID entries as one run of bytes (`cpuid_of`, else asked of KVM now)."""
    known = _CPUIDS.get(vcpu)
    if known is None or known[0] is not vcpu.cpuid_set:
        return b"".join(get_cpuid_bytes(vcpu))
    return known[2]


def cpuid_table_is_set(vcpu: Vcpu, table: bytes) -> bool:
    """True when `table` (entries back to back) is exactly the table last set on `vcpu`."""
    raw = vcpu.cpuid_set
    return raw is not None and raw[_CPUID2_HEADER_BYTES:] == table


def cpuid_is_set(vcpu: Vcpu, entries: tuple[bytes, ...]) -> bool:
    """True when `entries` (CPUID_ENTRY_BYTES each) are exactly the table last set on `vcpu`,
    byte for byte."""
    raw = vcpu.cpuid_set
    return raw is not None and raw[_CPUID2_HEADER_BYTES:] == b"".join(entries)
