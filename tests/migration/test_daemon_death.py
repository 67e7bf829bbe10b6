"""Daemon death accounted for: the VMs a daemon hosted die with its process (they are its fds and
threads); the next daemon on the same state dir reports each of them, and the peer of a migration
whose other side died cleans up by itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import MakeDaemon
from daemons import wait_for, wait_migration
from migrated.vmrecords import VmRecords
from test_daemon_service import migratectl
from test_migration import assert_runs_here, create

pytestmark = pytest.mark.kvm


def test_a_restarted_daemon_reports_the_vms_that_died_with_its_predecessor(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    create(a, name="web", memory_mib=32, working_set_mib=8)
    create(a, name="db", memory_mib=32, working_set_mib=8)
    a.call("vm.pause", name="db")
    create(a, name="gone", memory_mib=32, working_set_mib=8)
    a.call("vm.stop", name="gone")  # stopped on purpose: not lost
    assert a.process is not None
    dead_pid = a.process.pid
    a.kill()
    a.start()
    assert a.call("vm.list") == [], "the VMs died with their daemon; nothing pretends otherwise"
    lost = {v["name"]: v for v in json.loads(migratectl(a, "vm", "list", "--lost", "--json").stdout)}
    assert set(lost) == {"web", "db"}, lost
    assert lost["web"]["state"] == "running" and lost["db"]["state"] == "paused"
    assert all(v["pid"] == dead_pid for v in lost.values())
    assert "died" in lost["web"]["detail"]
    log = a.log()
    assert log.count('"event": "vm_lost_at_restart"') == 2, log
    assert a.call("daemon.status")["lost_vms"] == 2
    text = migratectl(a, "vm", "list", "--lost")
    assert text.returncode == 0 and "web" in text.stdout and "db" in text.stdout, text
    # The operator dealt with it: forgotten; the name can be used again.
    assert migratectl(a, "vm", "forget", "web").returncode == 0
    assert [v["name"] for v in a.call("vm.list", lost=True)] == ["db"]
    assert migratectl(a, "vm", "forget", "web").returncode != 0, "forgetting twice names the problem"
    create(a, name="web", memory_mib=32, working_set_mib=8)
    # A second restart reports nothing new: each loss is reported once.
    a.kill()
    a.start()
    assert sorted(v["name"] for v in a.call("vm.list", lost=True)) == ["db", "web"]
    assert a.log().count('"event": "vm_lost_at_restart"') == 3


def test_the_target_discards_its_copy_when_the_source_dies(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a", max_bandwidth_mib_s=32), make_daemon("b")
    create(a, memory_mib=256, rate=16, working_set_mib=200)
    wait_for(lambda: a.call("vm.show", name="vm1")["guest"]["pages_written"] > 200 * 256, timeout=30, what="data")
    a.call("migrate", name="vm1", to=b.address)
    wait_migration(a, "vm1", until=("bulk",))
    wait_for(lambda: "vm1" in [v["name"] for v in b.call("vm.list")], what="the copy on b")
    a.kill()
    wait_for(lambda: "vm1" not in [v["name"] for v in b.call("vm.list")], timeout=30, what="b to discard its copy")
    assert '"event": "incoming_vm_discarded"' in b.log()


def test_a_vm_committed_to_a_target_is_reported_as_possibly_running_there(tmp_path: Path) -> None:
    """The record of a VM whose COMMIT had gone out when its daemon died points at the target."""
    records = VmRecords(tmp_path)
    records.write("web", "migrating")
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "m1.json").write_text(json.dumps({"vm": "web", "target": "10.0.0.2:7890", "state": "committed"}))
    (tmp_path / "vms" / "web.json").write_text(
        json.dumps({"name": "web", "state": "migrating", "since": 1.0, "pid": os.getpid() + 1})
    )
    (lost,) = records.recover()
    assert lost.name == "web" and "10.0.0.2:7890" in lost.detail and "may be running there" in lost.detail
    assert records.recover() == [], "reported once"
    assert [v.name for v in records.lost()] == ["web"]


def test_sigterm_in_the_middle_of_a_migration_hands_the_vm_over(make_daemon: MakeDaemon) -> None:
    """A clean stop lets an outgoing migration finish: the VM ends on the target, not cut off."""
    a = make_daemon(
        "a", max_rounds=4, downtime_limit_ms=1, on_no_convergence="force-downtime", faults="source-stall-rounds"
    )
    b = make_daemon("b")
    create(a, rate=8.0, memory_mib=64, working_set_mib=16)
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: a.call("migration.status", name="vm1")["round"] >= 1, what="the dirty rounds")
    assert a.stop() == 0
    log = a.log()
    assert '"event": "finishing_migrations_before_stop"' in log, log
    assert '"state": "completed", "event": "migration_finished_before_stop"' in log, log
    assert_runs_here(b, "vm1")
    a.start()
    assert a.call("vm.list", lost=True) == [], "handed over, not lost"


def test_vms_stopped_with_their_daemon_are_reported_at_the_next_start(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    create(a, name="web", memory_mib=32, working_set_mib=8)
    assert a.stop() == 0
    a.start()
    (lost,) = a.call("vm.list", lost=True)
    assert lost["name"] == "web" and lost["state"] == "running", lost
    assert "stopped when its daemon was stopped" in lost["detail"], lost
    assert a.log().count('"event": "vm_lost_at_restart"') == 1


def test_a_target_killed_after_the_resume_reports_that_the_vm_may_have_run_here(make_daemon: MakeDaemon) -> None:
    """The target's record says running only after RUNNING went out; killed between the resume
    and that record (held there: fault cutover-holds), its successor must not claim the source
    still has the VM: COMMIT had come, and the VM ran here and died with the daemon."""
    a, b = make_daemon("a"), make_daemon("b", faults="cutover-holds")
    create(a, rate=4, memory_mib=64, working_set_mib=8)
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: '"point": "running"' in b.log(), what="the target to resume and hold before RUNNING")
    b.kill()
    b.start()
    (lost,) = b.call("vm.list", lost=True)
    assert lost["name"] == "vm1" and lost["state"] == "incoming", lost
    assert "if it had, the VM ran here and died with this daemon" in lost["detail"], lost
    stats = wait_migration(a, "vm1", until=("in-doubt", "completed", "failed"))
    assert stats["state"] == "in-doubt", "COMMIT went out and RUNNING never came: never resumed blindly"
