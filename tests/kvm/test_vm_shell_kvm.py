"""A VM built from an empty one made ahead (`Vm.create_empty`, the warm shell of vmshell.py),
on real KVM: the same order as a whole build (R1/R2 before any memslot and vCPU), a working
VM, a shell refused for a VM of another kind, and no fd left behind, also by `VmShell`'s
service when it is cancelled as the daemon stops."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import trio
from helpers import write_key

from migrated.config import load_config
from migrated.kvm.arch import create_empty, create_vm
from migrated.kvm.errors import VmConfigError
from migrated.kvm.system import Kvm
from migrated.kvm.vm import VmConfig
from migrated.vmshell import VmShell, shell_config

pytestmark = pytest.mark.kvm

CONFIG = VmConfig(memory_bytes=16 << 20, vcpus=2, dirty_tracking="ring", ring_bytes=1 << 16)


def _vm_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:kvm-vm"
        except OSError:
            continue
    return count


def test_a_vm_built_from_a_shell_is_whole_and_tracks_its_writes(kvm: Kvm) -> None:
    before = _vm_fds()
    shell = create_empty(kvm, dataclasses.replace(CONFIG, name="shell"))
    # R1/R2: the ring is on, and nothing exists that it must come before.
    assert shell.ring_bytes == 1 << 16 and not shell.memslots and not shell.vcpus and shell.memory is None
    assert _vm_fds() == before + 1
    with create_vm(kvm, CONFIG, shell=shell) as vm:
        assert vm is shell and vm.name == CONFIG.name and len(vm.vcpus) == 2 and len(vm.memslots) == 1
        assert vm.tracker is not None and vm.tracker.stats.backup_bitmap is not None
        vm.write_guest(0x10000, b"x" * 4096)
        assert bytes(vm.ram[0x10000:0x10004]) == b"xxxx"
        vm.start(running=False)
    assert _vm_fds() == before


def test_a_shell_of_another_kind_or_used_is_refused_and_closed(kvm: Kvm) -> None:
    before = _vm_fds()
    shell = create_empty(kvm, CONFIG)
    with pytest.raises(VmConfigError, match="does not fit a VM of kind"):
        create_vm(kvm, dataclasses.replace(CONFIG, ring_bytes=1 << 17), shell=shell)
    assert shell.fd == -1 and _vm_fds() == before
    with create_vm(kvm, CONFIG) as built:
        with pytest.raises(VmConfigError, match="is used"):
            create_vm(kvm, CONFIG, shell=built)


def test_the_shell_service_closes_its_shell_when_cancelled(kvm: Kvm, tmp_path: Path) -> None:
    config = load_config(None, {"peer_key_file": write_key(tmp_path / "peer.key")})
    shells = VmShell(kvm, lambda: config)
    before = _vm_fds()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(shells.serve)
            assert shells.status()["ready"] and _vm_fds() == before + 1
            taken, why = shells.take(dataclasses.replace(shell_config(config), memory_bytes=64 << 20, vcpus=3))
            assert why == "used" and taken is not None
            assert shells.take(shell_config(config)) == (None, "none"), "never handed out twice"
            taken.close()
            shells.refill()
            with trio.fail_after(10):
                while not shells.status()["ready"]:
                    await trio.sleep(0.01)
            assert shells.status()["made"] == 2 and _vm_fds() == before + 1
            mismatch = dataclasses.replace(shell_config(config), irqchip=True, pit=True)
            assert shells.take(mismatch) == (None, "mismatch") and shells.status()["ready"]
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert _vm_fds() == before and not shells.status()["ready"]
