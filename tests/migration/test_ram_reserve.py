"""The daemon's RAM reserve (migrated/kvm/ramreserve.py) with real daemons, real KVM and the
workload guest, whose pages check themselves: a VM that comes back lands in the RAM file it left
(its pages already there), with its memory exact; and a new VM made from a kept file reads none of
the bytes of the VM before it."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemons import (
    DaemonProcess,
    MakeDaemon,
    guest_ram_fds,
    ram_given_back,
    wait_for,
    wait_migration,
    write_config,
)
from helpers import write_key
from test_migration import assert_absent, assert_runs_here, create, migrate

pytestmark = pytest.mark.kvm

PAGE = 4096


def reserve(daemon: DaemonProcess) -> dict[str, Any]:
    status: dict[str, Any] = daemon.call("daemon.status")["ram_reserve"]
    return status


def test_a_vm_that_comes_back_lands_in_the_ram_it_left(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", verify="full"), make_daemon("b", verify="full")
    create(a, rate=16, memory_mib=128, vcpus=1, working_set_mib=32)
    assert a.call("vm.show", name="vm1")["ram_from_reserve"] is False, "nothing kept yet"
    there = migrate(a, b)
    assert there["state"] == "completed", there
    assert wait_migration(b, "vm1")["ram_from_reserve"] is False
    wait_for(lambda: reserve(a)["files"] == 1, what="a to keep the RAM file of the VM that left")
    assert reserve(a)["kept_mib"] > 0, reserve(a)
    back = migrate(b, a)
    assert back["state"] == "completed", back
    incoming = wait_migration(a, "vm1")
    assert incoming["ram_from_reserve"] is True, incoming
    assert incoming["digest"] == back["digest"] is not None, "memory exact"
    assert reserve(a)["taken"] == 1 and reserve(a)["files"] == 0, reserve(a)
    assert a.call("vm.show", name="vm1")["ram_from_reserve"] is True
    assert_runs_here(a, "vm1")  # the guest re-verifies its own pages: none wrong
    assert_absent(b, "vm1")
    # No RAM file is lost track of: each daemon holds its VMs' and its reserve's, no more.
    for daemon, vms in ((a, 1), (b, 0)):
        given = ram_given_back(daemon)
        assert given == 1, (daemon.name, given)  # the VM left each daemon once
        assert guest_ram_fds(daemon) == vms + reserve(daemon)["files"], (daemon.name, reserve(daemon))


def nonzero_pages(daemon: DaemonProcess, name: str, path: Path) -> int:
    daemon.call("vm.pause", name=name)
    daemon.call("vm.dump", name=name, file=str(path))
    pages = np.fromfile(path, np.uint8).reshape(-1, PAGE)
    return int(np.count_nonzero(pages.any(axis=1)))


def test_a_new_vm_never_sees_the_bytes_of_the_one_before(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """vm1 writes its 8 MiB working set and is stopped; vm2, made after it from the kept file,
    holds as many non-zero pages as the same vm2 made on a daemon without a reserve (its own image
    and data), not vm1's 2,048 more."""
    a = make_daemon("a")
    plain_config = write_config(tmp_path / "plain.toml")
    plain_config.write_text(plain_config.read_text() + "[vm]\nram_reserve_mib = 0\n")
    plain = DaemonProcess("plain", tmp_path, tmp_path / "peer.key", extra_args=("--config", str(plain_config))).start()
    try:
        create(a, rate=64, memory_mib=128, vcpus=1, working_set_mib=8)
        wait_for(
            lambda: a.call("vm.show", name="vm1")["memory_allocated_bytes"] >= 8 << 20,
            what="vm1 to write its working set",
        )
        written = nonzero_pages(a, "vm1", tmp_path / "vm1.bin")
        assert written >= 8 * 256, f"precondition: vm1 wrote its working set ({written} pages)"
        a.call("vm.stop", name="vm1")
        wait_for(lambda: reserve(a)["files"] == 1, what="a to keep vm1's RAM file, zeroed")
        for daemon in (a, plain):
            create(daemon, name="vm2", rate=0.0, memory_mib=128, vcpus=1, working_set_mib=1)
        assert a.call("vm.show", name="vm2")["ram_from_reserve"] is True
        assert plain.call("vm.show", name="vm2")["ram_from_reserve"] is False
        assert reserve(plain)["limit_mib"] == 0
        from_reserve = nonzero_pages(a, "vm2", tmp_path / "vm2-a.bin")
        fresh = nonzero_pages(plain, "vm2", tmp_path / "vm2-plain.bin")
        assert from_reserve <= fresh + 16, f"vm2 from the reserve: {from_reserve} non-zero pages, fresh: {fresh}"
    finally:
        plain.stop()


def test_a_reload_that_turns_the_reserve_off_frees_what_it_keeps(tmp_path: Path) -> None:
    config = write_config(tmp_path / "a.toml")
    a = DaemonProcess("a", tmp_path, write_key(tmp_path / "peer.key"), extra_args=("--config", str(config))).start()
    try:
        create(a, rate=16, memory_mib=64, vcpus=1, working_set_mib=8)
        a.call("vm.stop", name="vm1")
        wait_for(lambda: reserve(a)["files"] == 1, what="a to keep vm1's RAM file")
        config.write_text(config.read_text() + "[vm]\nram_reserve_mib = 0\n")
        assert a.process is not None
        a.process.send_signal(signal.SIGHUP)
        wait_for(lambda: reserve(a)["files"] == 0, what="the reload to free the kept file")
        assert reserve(a)["limit_mib"] == 0 and reserve(a)["released"] == {"over_limit": 1}, reserve(a)
        assert a.alive()
    finally:
        a.stop()
