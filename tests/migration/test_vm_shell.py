"""The target's warm VM shell (migrated/vmshell.py): one empty VM made before READY, taken by an
incoming VM of its kind, made again after that migration, never shared, closed with the daemon.
Real daemons, real KVM, real sockets; the shell is seen in the target's stats (`vm_shell`), in
`daemon.status` and in the daemon's open fds (one `anon_inode:kvm-vm` per VM fd)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from daemons import DaemonProcess, MakeDaemon, wait_for, wait_migration, write_config
from test_migration import assert_absent, assert_runs_here, create, migrate

pytestmark = pytest.mark.kvm


def vm_fds(daemon: DaemonProcess) -> int:
    """The daemon's open KVM VM fds: one per hosted VM, plus the shell."""
    assert daemon.process is not None
    count = 0
    for fd in Path(f"/proc/{daemon.process.pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == "anon_inode:kvm-vm"
        except OSError:
            continue  # closed since the listing
    return count


def shell(daemon: DaemonProcess) -> dict[str, Any]:
    status: dict[str, Any] = daemon.call("daemon.status")["vm_shell"]
    return status


def test_an_incoming_vm_takes_the_shell_and_a_new_one_is_made_after(make_daemon: MakeDaemon) -> None:
    """Ping-pong, memory checked each way (verify full): every incoming VM is built from a
    shell, and each daemon has its next one once the migration ended; no VM fd is left over."""
    a, b = make_daemon("a", verify="full"), make_daemon("b", verify="full")
    for daemon in (a, b):
        # The control socket answers before READY; the shell is there by READY.
        wait_for(lambda d=daemon: d.events("daemon_ready"), what=f"{daemon.name} to be ready")
        assert shell(daemon) == {
            "enabled": True,
            "ready": True,
            "kind": "(ring of 1048576 bytes)",
            "made": 1,
            "taken": 0,
            "error": None,
        }, "made before READY"
        assert vm_fds(daemon) == 1, "the shell only"
    create(a, rate=16, memory_mib=128, vcpus=1, working_set_mib=32)
    assert vm_fds(a) == 2
    for round_trip in range(2):
        for source, target in ((a, b), (b, a)):
            stats = migrate(source, target)
            assert stats["state"] == "completed", stats
            incoming = wait_migration(target, "vm1")
            assert incoming["vm_shell"] == "used", incoming
            assert incoming["digest"] == stats["digest"] is not None, "memory exact"
            taken = round_trip + 1
            wait_for(lambda t=target, n=taken: shell(t)["made"] == n + 1, what=f"{target.name}'s next shell")
            assert shell(target)["taken"] == taken and shell(target)["ready"], shell(target)
            assert_runs_here(target, "vm1")
            assert_absent(source, "vm1")
            wait_for(lambda s=source: vm_fds(s) == 1, what=f"{source.name} to close the VM it released")
            assert vm_fds(target) == 2, "the VM (its fd was the shell's) and the next shell"


def test_a_vm_of_another_kind_is_built_fresh_and_the_shell_stays(make_daemon: MakeDaemon) -> None:
    """The small OS needs the in-kernel irqchip and PIT, which the shell has not: built from
    scratch, and the shell is still there for the next one (and no second one is made)."""
    a, b = make_daemon("a"), make_daemon("b")
    a.call("vm.create", name="os1", memory_mib=128, vcpus=1, guest="smallos", dirty_rate_mib_s=8, working_set_mib=32)
    wait_for(lambda: a.call("vm.show", name="os1")["guest"]["heartbeat_generation"] > 0, what="the guest's heartbeat")
    stats = migrate(a, b, name="os1")
    assert stats["state"] == "completed", stats
    incoming = wait_migration(b, "os1")
    assert incoming["vm_shell"] == "mismatch", incoming
    assert shell(b)["ready"] and shell(b)["made"] == 1 and shell(b)["taken"] == 0, shell(b)
    assert vm_fds(b) == 2, "the VM, built fresh, and the shell"
    create(b, name="vm2", rate=0.0, memory_mib=64, vcpus=1, working_set_mib=16)
    back = migrate(b, a, name="vm2")
    assert back["state"] == "completed", back
    assert wait_migration(a, "vm2")["vm_shell"] == "used"


def test_a_failed_build_with_the_shell_refuses_and_the_daemon_makes_another(make_daemon: MakeDaemon) -> None:
    """The build after ACCEPT fails (fault target-build-fails) with the shell taken: the source
    resumes its VM, the shell is closed with the failed build (no fd left) and a new one made."""
    a, b = make_daemon("a"), make_daemon("b", faults="target-build-fails")
    create(a, rate=16, memory_mib=128, vcpus=1, working_set_mib=32)
    stats = migrate(a, b)
    # The source hears the refusal, or first sees its data streams closed by it: failed either way.
    assert stats["state"] == "failed", stats
    assert "accept" in stats["phase_steps_ms"], "precondition: the build came after ACCEPT"
    (refused,) = b.events("incoming_vm_refused")
    assert "target-build-fails" in refused["error"], refused
    assert_runs_here(a, "vm1")
    assert_absent(b, "vm1")
    wait_for(lambda: shell(b)["made"] == 2, what="b's next shell")
    assert shell(b)["taken"] == 1, shell(b)
    assert vm_fds(b) == 1, "the new shell only"
    assert b.alive()


def test_the_shell_can_be_turned_off_and_on_by_reload(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    a = make_daemon("a")
    config = write_config(tmp_path / "b.toml")
    config.write_text(config.read_text() + "warm_vm_shell = false\n")
    b = DaemonProcess("b", tmp_path, tmp_path / "peer.key", extra_args=("--config", str(config))).start()
    try:
        _off_and_on(a, b, config)
    finally:
        b.stop()


def _off_and_on(a: DaemonProcess, b: DaemonProcess, config: Path) -> None:
    assert shell(b)["enabled"] is False and shell(b)["made"] == 0, shell(b)
    assert vm_fds(b) == 0
    create(a, rate=0.0, memory_mib=64, vcpus=1, working_set_mib=16)
    stats = migrate(a, b)
    assert stats["state"] == "completed", stats
    assert wait_migration(b, "vm1")["vm_shell"] == "off"
    # On again by SIGHUP: made without a migration; off again: closed.
    config.write_text(config.read_text().replace("warm_vm_shell = false", "warm_vm_shell = true"))
    assert b.process is not None
    b.process.send_signal(signal.SIGHUP)
    wait_for(lambda: shell(b)["ready"], what="the shell after the reload")
    assert vm_fds(b) == 2
    config.write_text(config.read_text().replace("warm_vm_shell = true", "warm_vm_shell = false"))
    b.process.send_signal(signal.SIGHUP)
    wait_for(lambda: not shell(b)["ready"], what="the shell to be closed")
    assert vm_fds(b) == 1, "only the VM"


def test_two_vms_arriving_at_once_never_share_the_shell(make_daemon: MakeDaemon) -> None:
    """Two incoming migrations at the same time: one VM is built from the shell, the other from
    scratch (none ready), both arrive whole, and one new shell is made after. The target holds
    0.3 s at LOADED and at RUNNING (cutover-holds), so the first migration cannot have ended,
    and its shell been made again, before the second one's build."""
    a, b = make_daemon("a", verify="full"), make_daemon("b", verify="full", faults="cutover-holds")
    wait_for(lambda: b.events("daemon_ready"), what="b to be ready")
    for name in ("vm1", "vm2"):
        create(a, name=name, rate=16, memory_mib=128, vcpus=1, working_set_mib=32)
    for name in ("vm1", "vm2"):
        a.call("migrate", name=name, to=b.address)
    for name in ("vm1", "vm2"):
        assert wait_migration(a, name)["state"] == "completed"
    used = sorted(wait_migration(b, name)["vm_shell"] for name in ("vm1", "vm2"))
    assert used == ["none", "used"], used
    wait_for(lambda: shell(b)["made"] == 2, what="b's next shell")
    assert shell(b)["taken"] == 1
    for name in ("vm1", "vm2"):
        assert_runs_here(b, name)
    assert vm_fds(b) == 3, "two VMs and the next shell"
