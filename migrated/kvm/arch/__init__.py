"""The architecture seam: everything that differs between x86_64 and arm64 is reached through the
object `host_arch()` returns; the rest of the daemon never compares architecture names.

`create_vm` is `Vm.create` with this host's architecture.
"""

from __future__ import annotations

import os

from ..errors import KvmUnavailableError
from ..system import Kvm
from ..vm import Vm, VmArch, VmConfig
from .aarch64 import Aarch64
from .x86_64 import X86_64

ARCHES: dict[str, VmArch] = {"x86_64": X86_64(), "aarch64": Aarch64()}


def host_arch(machine: str | None = None) -> VmArch:
    """The architecture object for `machine` (default: this host's, from uname)."""
    name = machine or os.uname().machine
    arch = ARCHES.get(name)
    if arch is None:
        raise KvmUnavailableError(f"architecture {name!r}: this VMM supports {', '.join(sorted(ARCHES))}")
    return arch


def create_vm(kvm: Kvm, config: VmConfig) -> Vm:
    return Vm.create(kvm, config, host_arch(kvm.caps().arch))
