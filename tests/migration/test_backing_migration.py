"""Guest RAM backings through real daemons: chosen per daemon and per VM, shown by `vm show`,
refused with the reason, and live migration between daemons that back RAM differently.

The daemon mounts its own huge-page tmpfs (<state_dir>/ram) as the root daemon outside systemd
does, and unmounts it when it stops. Huge pages for hugetlbfs are reserved through
/proc/sys/vm/nr_hugepages and the old value restored; the tests that need them skip only when
the kernel cannot reserve a single one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import DaemonProcess, heartbeat, wait_for, wait_migration
from helpers import hugetlb_free, hugetlb_pool, write_key
from migrated.control import RequestError

pytestmark = pytest.mark.kvm

MEMORY_MIB = 128


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """start_daemon(name, memory_backing) -> a daemon whose [vm] memory_backing is that."""
    started: list[DaemonProcess] = []
    key = write_key(tmp_path / "peer.key")

    def start(name: str, memory_backing: str = "memfd") -> DaemonProcess:
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'[peer]\nconnect_timeout_s = 3\n[vm]\nmemory_backing = "{memory_backing}"\n'
            "[migration]\ndowntime_guard_ms = 60000\n"
        )
        daemon = DaemonProcess(name, tmp_path, key, extra_args=("--config", str(config)))
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def huge_pages() -> Iterator[int]:
    """Enough free huge pages for two VMs of MEMORY_MIB (source and target on one host)."""
    wanted = 2 * MEMORY_MIB // 2
    with hugetlb_pool(wanted) as free:
        if free == 0:
            pytest.skip("the kernel reserved no huge page (nr_hugepages): nothing to back hugetlbfs RAM")
        assert free >= wanted, f"only {free} of {wanted} huge pages could be reserved"
        yield free


def _mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def create(daemon: DaemonProcess, name: str, memory_mib: int = MEMORY_MIB, **extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = daemon.call(
        "vm.create", name=name, memory_mib=memory_mib, vcpus=1, dirty_rate_mib_s=32.0, working_set_mib=32, **extra
    )
    wait_for(lambda: heartbeat(daemon, name) > 0, what=f"{name}'s first heartbeat")
    return info


def assert_runs_on(daemon: DaemonProcess, name: str, backing: str) -> dict[str, Any]:
    before = daemon.call("vm.show", name=name)
    assert before["state"] == "running" and before["memory_backing"] == backing, before
    wait_for(lambda: heartbeat(daemon, name) > before["guest"]["heartbeat_generation"] + 5, what="the heartbeat")
    after: dict[str, Any] = daemon.call("vm.show", name=name)
    assert after["guest"]["verification_errors"] == 0 and after["error"] is None, after
    return after


def test_daemon_default_and_per_vm_override(start_daemon: Any, tmp_path: Path) -> None:
    daemon = start_daemon("a", "shmem-huge")
    ram_dir = tmp_path / "a-state" / "ram"
    assert _mounted(ram_dir)  # its default backing is checked (and mounted) before it serves
    created = create(daemon, "huge")
    assert created["memory_backing"] == "shmem-huge"
    create(daemon, "small", memory_backing="memfd")
    shown = assert_runs_on(daemon, "huge", "shmem-huge")
    # 2 MiB pages: what the guest touched, rounded up to whole huge pages, not all of its RAM.
    assert 0 < shown["memory_allocated_bytes"] < MEMORY_MIB << 20
    assert shown["memory_allocated_bytes"] % (2 << 20) == 0
    assert assert_runs_on(daemon, "small", "memfd")["memory_allocated_bytes"] > 0
    assert os.listdir(ram_dir) == []  # unnamed files only
    daemon.call("vm.pause", name="huge")
    dump = tmp_path / "huge.bin"
    daemon.call("vm.dump", name="huge", file=str(dump))
    data = dump.read_bytes()
    assert len(data) == MEMORY_MIB << 20 and data.count(0) < len(data)  # all of RAM, the guest's writes in it
    daemon.call("vm.resume", name="huge")
    assert daemon.stop() == 0
    assert not _mounted(ram_dir)  # the daemon unmounts what it mounted


def test_a_killed_daemons_tmpfs_is_adopted_and_unmounted_by_its_successor(start_daemon: Any, tmp_path: Path) -> None:
    first = start_daemon("a", "shmem-huge")
    ram_dir = tmp_path / "a-state" / "ram"
    assert _mounted(ram_dir)
    first.kill()  # SIGKILL: no chance to unmount
    assert _mounted(ram_dir)
    second = start_daemon("a", "shmem-huge")
    create(second, "huge")
    assert_runs_on(second, "huge", "shmem-huge")
    assert second.stop() == 0
    assert not _mounted(ram_dir)  # the successor took the leftover mount for its own


def test_bad_backing_requests_are_refused_and_the_daemon_serves_on(start_daemon: Any) -> None:
    daemon = start_daemon("a")
    create(daemon, "keeps-running")
    with pytest.raises(RequestError, match="memory backing 'ram': allowed are memfd, shmem-huge, hugetlbfs"):
        daemon.call("vm.create", name="bad", memory_mib=MEMORY_MIB, memory_backing="ram")
    free = hugetlb_free()
    pages = max(16, free + 1)
    with pytest.raises(RequestError, match=rf"needs {pages} huge pages of 2048 KiB, only {free} are free"):
        daemon.call("vm.create", name="bad", memory_mib=2 * pages, memory_backing="hugetlbfs", guest="none")
    assert [vm["name"] for vm in daemon.call("vm.list")] == ["keeps-running"]
    assert_runs_on(daemon, "keeps-running", "memfd")


@pytest.mark.parametrize(
    ("source_backing", "target_backing", "told"),
    [
        ("memfd", "shmem-huge", False),  # the target daemon's own choice
        ("shmem-huge", "hugetlbfs", True),  # named by the operator at `migrate`
        ("hugetlbfs", "memfd", False),
    ],
)
def test_live_migration_between_backings(
    start_daemon: Any, huge_pages: int, source_backing: str, target_backing: str, told: bool
) -> None:
    source = start_daemon("src", source_backing)
    target = start_daemon("dst", "memfd" if told else target_backing)
    create(source, "vm1")
    options = {"target_memory_backing": target_backing} if told else {}
    source.call("migrate", name="vm1", to=target.address, **options)
    stats = wait_migration(source, "vm1")
    assert stats["state"] == "completed", stats
    assert stats["memory_backing"] == source_backing
    assert stats["digest"]  # verify "full": the target's RAM digest matched the source's
    assert_runs_on(target, "vm1", target_backing)
    assert wait_migration(target, "vm1")["memory_backing"] == target_backing
    assert "vm1" not in [vm["name"] for vm in source.call("vm.list")]


def test_a_target_without_the_backing_refuses_and_the_vm_runs_on(start_daemon: Any) -> None:
    source, target = start_daemon("src"), start_daemon("dst")
    pages = max(MEMORY_MIB // 2, hugetlb_free() + 1)  # more than the pool has (memfd: sparse, cheap)
    create(source, "vm1", memory_mib=2 * pages)
    source.call("migrate", name="vm1", to=target.address, target_memory_backing="hugetlbfs")
    stats = wait_migration(source, "vm1")
    assert stats["state"] in ("failed", "aborted"), stats
    assert f"needs {pages} huge pages of 2048 KiB" in stats["error"], stats
    assert_runs_on(source, "vm1", "memfd")
    assert "vm1" not in [vm["name"] for vm in target.call("vm.list")]


def test_a_default_backing_the_daemon_cannot_have_stops_its_start(tmp_path: Path) -> None:
    plain = tmp_path / "not-huge"
    plain.mkdir()
    config = tmp_path / "bad.toml"
    config.write_text(f'[vm]\nmemory_backing = "shmem-huge"\nmemory_backing_dir = "{plain}"\n')
    daemon = DaemonProcess("bad", tmp_path, write_key(tmp_path / "peer.key"), extra_args=("--config", str(config)))
    with pytest.raises(RuntimeError, match="did not start"):
        daemon.start(timeout=60)
    assert daemon.process is not None and daemon.process.wait(timeout=30) == 1
    assert f"vm.memory_backing_dir: {plain} is on a" in daemon.log(), daemon.log()
    assert not daemon.socket.exists()
