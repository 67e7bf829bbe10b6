"""The setup overlaps: the source connects its data streams while the target builds the VM, and
the target holds them until the VM exists (two real daemons, real KVM, real sockets).

The fault target-build-after-streams makes the target build only once every stream connected
and waits, so each test sees the overlap every time instead of by luck of timing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemons import DaemonProcess, guest_ram_fds, heartbeat, ram_given_back, wait_for, wait_migration
from helpers import hugetlb_free, write_key

pytestmark = pytest.mark.kvm

MEMORY_MIB = 128
STREAMS = 3


def _daemon(tmp_path: Path, name: str, key: Path, faults: str = "") -> DaemonProcess:
    config = tmp_path / f"{name}.toml"
    config.write_text(f"[peer]\nconnect_timeout_s = 5\n[migration]\nstreams = {STREAMS}\ndowntime_guard_ms = 60000\n")
    return DaemonProcess(name, tmp_path, key, extra_args=("--config", str(config)), faults=faults).start()


@pytest.fixture
def pair(tmp_path: Path) -> Any:
    key = write_key(tmp_path / "peer.key")
    source = _daemon(tmp_path, "src", key)
    target = _daemon(tmp_path, "dst", key, faults="target-build-after-streams")
    yield source, target
    source.stop()
    target.stop()


def _create(daemon: DaemonProcess, memory_mib: int = MEMORY_MIB) -> None:
    """An idle workload guest (its heartbeat runs, it dirties nothing on purpose): what these
    tests look at is the setup, and a loaded host must not make the rounds miss the limit."""
    daemon.call("vm.create", name="vm1", memory_mib=memory_mib, vcpus=1, dirty_rate_mib_s=0.0, working_set_mib=32)
    wait_for(lambda: heartbeat(daemon, "vm1") > 0, what="the guest's first heartbeat")


def _assert_runs_on(daemon: DaemonProcess) -> None:
    before = daemon.call("vm.show", name="vm1")
    assert before["state"] == "running", before
    wait_for(lambda: heartbeat(daemon, "vm1") > before["guest"]["heartbeat_generation"] + 5, what="the heartbeat")
    after = daemon.call("vm.show", name="vm1")
    assert after["guest"]["verification_errors"] == 0 and after["error"] is None, after


def _log_events(daemon: DaemonProcess, event: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if f'"event": "{event}"' in line]


def _assert_setup_timelines(source: DaemonProcess, target: DaemonProcess) -> None:
    """Each side logs its setup's fine marks once, in the order the steps ran, on one clock."""
    for daemon, order in (
        (source, ["task_started", "connected", "hello_sent", "hello_received", "auth_sent", "auth_received"]),
        (target, ["hello_received", "hello_sent", "auth_received", "auth_sent", "described", "checked"]),
    ):
        (timeline,) = daemon.events("setup_timeline")
        marks = timeline["marks_ms"]
        assert [mark for mark in marks if mark in order] == order, timeline
    (incoming,) = target.events("setup_timeline")
    # Only the RAM before ACCEPT; the VM is built after it, beside the bulk copy.
    built = ("ram_created", "accept_sent", "vm_created", "registered")
    assert [m for m in incoming["marks_ms"] if m in built] == list(built), incoming
    for daemon in (source, target):
        lines = daemon.log().splitlines()
        warmed = [i for i, line in enumerate(lines) if '"event": "daemon_warmed"' in line]
        ready = [i for i, line in enumerate(lines) if '"event": "daemon_ready"' in line]
        assert len(warmed) == len(ready) == 1 and warmed[0] < ready[0], daemon.log()


def test_streams_that_connect_while_the_target_builds_carry_the_vm(pair: Any) -> None:
    source, target = pair
    _create(source)
    source.call("migrate", name="vm1", to=target.address)
    stats = wait_migration(source, "vm1")
    assert stats["state"] == "completed", stats
    # Precondition of the test, not luck: every stream was waiting before the VM was built.
    assert len(_log_events(target, "data_stream_attached")) == STREAMS, target.log()
    incoming = wait_migration(target, "vm1")
    assert list(incoming["phase_steps_ms"])[:6] == [
        "handshake",
        "describe",
        "check",
        "create_ram",
        "accept",
        "build_and_register",
    ], incoming
    _assert_setup_timelines(source, target)
    _assert_runs_on(target)
    assert "vm1" not in [vm["name"] for vm in source.call("vm.list")]


def test_a_target_that_cannot_build_refuses_its_waiting_streams_and_the_vm_runs_on(pair: Any) -> None:
    """The streams connected and wait; the VM cannot be built here (hugetlbfs without enough
    huge pages): they are refused, the source resumes, and the daemons serve the next one."""
    source, target = pair
    pages = max(MEMORY_MIB // 2, hugetlb_free() + 1)  # more than the pool has (memfd: sparse, cheap)
    _create(source, memory_mib=2 * pages)
    source.call("migrate", name="vm1", to=target.address, target_memory_backing="hugetlbfs")
    stats = wait_migration(source, "vm1")
    assert stats["state"] in ("failed", "aborted"), stats
    assert f"needs {pages} huge pages" in stats["error"], stats
    _assert_runs_on(source)
    assert "vm1" not in [vm["name"] for vm in target.call("vm.list")]
    wait_for(
        lambda: len(_log_events(target, "data_stream_unused")) == STREAMS,
        what="the target to close every waiting stream",
    )
    # The migration's failure is the warning; its streams' end is no fault of theirs.
    assert not _log_events(target, "data_stream_refused"), target.log()
    assert not _log_events(target, "data_stream_attached"), target.log()
    # Nothing held on either side: the same VM migrates now, into the default backing.
    source.call("migrate", name="vm1", to=target.address)
    again = wait_migration(source, "vm1")
    assert again["state"] == "completed", again
    _assert_runs_on(target)


def test_a_stream_that_cannot_connect_while_the_target_builds_leaves_the_vm_running_here(tmp_path: Path) -> None:
    """The kernel refuses the source's data streams (fault source-streams-refused), which
    connect during the setup, beside the target's VM build: the migration fails naming the
    streams, the VM runs on at the source, and the target discards whatever it built."""
    key = write_key(tmp_path / "peer.key")
    source = _daemon(tmp_path, "src", key, faults="source-streams-refused,source-record-slow")
    target = _daemon(tmp_path, "dst", key)
    try:
        _create(source)
        source.call("migrate", name="vm1", to=target.address)
        stats = wait_migration(source, "vm1")
        assert stats["state"] == "failed", stats
        assert "cannot open the data streams" in stats["error"] and "refused" in stats["error"], stats
        _assert_runs_on(source)
        # The "migrating" record, written beside the setup (0.5 s late: source-record-slow),
        # came first: the resume's is the last.
        wait_for(
            lambda: "overlapped.rearm_extents_record" in source.call("migration.status", name="vm1")["phase_steps_ms"],
            what='the "migrating" record to be written',
        )
        record = json.loads((source.workdir / "src-state" / "vms" / "vm1.json").read_text())
        assert record["state"] == "running", record
        wait_for(
            lambda: "vm1" not in [vm["name"] for vm in target.call("vm.list")],
            what="the target to discard its copy",
        )
        # Both daemons serve on: the other way round (the fault is the source daemon's own
        # outgoing streams), a VM arrives there whole.
        target.call("vm.create", name="vm2", memory_mib=MEMORY_MIB, vcpus=1, dirty_rate_mib_s=0.0, working_set_mib=32)
        wait_for(lambda: heartbeat(target, "vm2") > 0, what="vm2's first heartbeat")
        target.call("migrate", name="vm2", to=source.address)
        back = wait_migration(target, "vm2")
        assert back["state"] == "completed", back
    finally:
        source.stop()
        target.stop()


def test_a_build_that_fails_after_accept_frees_the_ram_and_the_vm_runs_on_here(tmp_path: Path) -> None:
    """ACCEPT comes once the RAM exists; the VM is built behind it, beside the bulk copy. That
    build fails (fault target-build-fails, as KVM_CREATE_VM refused for lack of memory, after
    every stream attached and writes into the RAM): the source is told and resumes, the target
    stops its streams before it frees the RAM, and serves the next migration."""
    key = write_key(tmp_path / "peer.key")
    source = _daemon(tmp_path, "src", key)
    target = _daemon(tmp_path, "dst", key, faults="target-build-after-streams,target-build-fails")
    try:
        _create(source)
        source.call("migrate", name="vm1", to=target.address)
        stats = wait_migration(source, "vm1")
        assert stats["state"] == "failed", stats
        assert "KVM_CREATE_VM (test fault target-build-fails) failed" in stats["error"], stats
        # Precondition: ACCEPT had gone out (the source was past its setup) before the failure.
        assert "accept" in stats["phase_steps_ms"], stats
        _assert_runs_on(source)
        (refused,) = target.events("incoming_vm_refused")
        assert "target-build-fails" in refused["error"], refused
        assert not target.events("setup_timeline"), target.log()  # logged for a VM that was built
        # The RAM it made is given up (zeroed and kept by its RAM reserve), not left with the VM.
        assert ram_given_back(target) == 1
        assert guest_ram_fds(target) == target.call("daemon.status")["ram_reserve"]["files"]
        assert "vm1" not in [vm["name"] for vm in target.call("vm.list")]
        assert target.alive()
    finally:
        source.stop()
        target.stop()


def test_a_vm_record_written_late_never_outlives_the_vm_released_to_the_target(tmp_path: Path) -> None:
    """The source writes its "migrating" VM record beside the setup and the bulk copy; here it
    takes 0.5 s (fault source-record-slow) while the migration itself needs far less. The pause
    waits for it, so the record is gone with the released VM, not written back after it (which
    a restarted daemon would report as a VM lost with it)."""
    key = write_key(tmp_path / "peer.key")
    source = _daemon(tmp_path, "src", key, faults="source-record-slow")
    target = _daemon(tmp_path, "dst", key)
    try:
        _create(source)
        records = source.workdir / "src-state" / "vms"
        assert (records / "vm1.json").exists()  # precondition: a hosted VM has its record
        source.call("migrate", name="vm1", to=target.address)
        stats = wait_migration(source, "vm1")
        assert stats["state"] == "completed", stats
        assert stats["phase_steps_ms"]["overlapped.rearm_extents_record"] >= 500, stats  # the fault was on
        assert not (records / "vm1.json").exists(), (records / "vm1.json").read_text()
        _assert_runs_on(target)
    finally:
        source.stop()
        target.stop()
