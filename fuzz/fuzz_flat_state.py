#!/usr/bin/env python3
"""Coverage-guided fuzzing of the flat x86 machine state's checks (migrated/kvm/arch/x86_64/
flatstate.py), what a target runs on a peer's record before any byte of it reaches KVM.

    .venv/bin/python fuzz/fuzz_flat_state.py -runs=1000000 [CORPUS_DIR ...]

Needs /dev/kvm: the checks compare the record with this host's KVM and with a real VM (built
once, 1 vCPU, in-kernel irqchip and PIT, never run), as a target's restore does; nothing is
written to that VM. The property for every input: the checks either accept it (then every vCPU's
block has exactly the layout's size and the whole record was accounted for) or raise one of the
state errors with a message; any other exception is a crash and stops the run with the input
saved. Seeds: a real record of that VM, and that record cut and bent.
"""

from __future__ import annotations

import struct
import sys

import atheris
from seeded import fuzz_from_seeds

with atheris.instrument_imports(include=["migrated.kvm.arch.x86_64"]):
    from migrated.kvm.arch.x86_64 import flatstate

from migrated.kvm.arch import create_vm
from migrated.kvm.saved_state import StateError
from migrated.kvm.system import Kvm
from migrated.kvm.vm import VmConfig

_KVM = Kvm.open()
_VM = create_vm(_KVM, VmConfig(memory_bytes=16 << 20, vcpus=1, irqchip=True, pit=True))
_RECORD = flatstate.save_flat(_VM, irqchip=True, pit=True)


def _bent(record: bytes, at: int, value: int) -> bytes:
    out = bytearray(record)
    struct.pack_into("<I", out, at, value)
    return bytes(out)


SEEDS = [
    _RECORD,
    _RECORD[:40],
    _RECORD[:-1],
    _bent(_RECORD, 12, 3),  # three vCPUs
    _bent(_RECORD, 48, 7),  # an odd CPUID size
    _bent(_RECORD, 16, 5000),  # too many MSRs
]


def test_one_input(data: bytes) -> None:
    try:
        layout, vcpus, _, _ = flatstate.check_record(_VM, data)
    except StateError as err:
        if not str(err):
            raise AssertionError("a refusal without a message") from err
        return
    if any(len(vcpu.block) != layout.size for vcpu in vcpus):
        raise AssertionError("a block of another size than its layout's passed")
    if len(vcpus) != len(_VM.vcpus):
        raise AssertionError(f"{len(vcpus)} vCPUs passed for a VM of {len(_VM.vcpus)}")


def main() -> None:
    fuzz_from_seeds(sys.argv, SEEDS, test_one_input, "fuzz_flat_state")


if __name__ == "__main__":
    main()
