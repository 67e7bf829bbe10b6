"""The kernel names of a VM's threads (migrated/kvm/threadnames.py): what `top -H` shows."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from migrated.kvm.arch import create_vm
from migrated.kvm.system import Kvm
from migrated.kvm.threadnames import kernel_name, name_this_thread
from migrated.kvm.vm import VmConfig


def _comm(native_id: int | None) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


@pytest.mark.parametrize(
    ("vm", "role", "expected"),
    [
        ("web1", "vcpu0", "web1-vcpu0"),
        ("a-rather-long-vm-name", "vcpu12", "a-rather-vcpu12"),
        ("a-rather-long-vm-name", "harvest", "a-rathe-harvest"),
        ("é" * 10, "vcpu0", "éééé-vcpu0"),  # cut between characters, never inside one
    ],
)
def test_the_role_is_kept_whole_and_the_vm_name_cut_to_fit(vm: str, role: str, expected: str) -> None:
    name = kernel_name(vm, role)
    assert name == expected and len(name.encode()) <= 15


def test_a_thread_names_itself() -> None:
    seen: list[str] = []

    def run() -> None:
        name_this_thread("named-by-test")
        seen.append(_comm(threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == ["named-by-test"]


@pytest.mark.kvm
def test_a_vms_vcpu_and_harvester_threads_carry_its_name() -> None:
    config = VmConfig(memory_bytes=16 << 20, vcpus=2, dirty_tracking="ring", name="named")
    with Kvm.open() as kvm, create_vm(kvm, config) as vm:
        vm.start(running=False)
        assert [_comm(v.thread_id) for v in vm.vcpus] == ["named-vcpu0", "named-vcpu1"]
        harvester = vm._harvester
        assert harvester is not None
        assert _comm(harvester.native_id) == "named-harvest"
