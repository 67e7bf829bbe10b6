"""The cutover's records and their order (DESIGN 5), as the downtime work placed them: the
source's "committing" record is on disk before the pause (no fsync between LOADED and COMMIT),
is overwritten when the migration ends before COMMIT, and the target writes its VM record after
RUNNING, also when RUNNING is lost. Real daemons, real KVM, the files they really write."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from daemons import DaemonProcess, MakeDaemon, wait_for, wait_migration
from test_migration import assert_absent, assert_runs_here, create, migrate

from migrated.migration.timeline import guest_downtime_ms
from migrated.vmrecords import VmRecords

pytestmark = pytest.mark.kvm


def migration_records(daemon: DaemonProcess) -> list[dict[str, Any]]:
    directory = daemon.workdir / f"{daemon.name}-state" / "migrations"
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []


def vm_record(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    path = daemon.workdir / f"{daemon.name}-state" / "vms" / f"{name}.json"
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return record


def test_the_commit_record_is_on_disk_while_the_vm_is_paused_and_released_after(make_daemon: MakeDaemon) -> None:
    """cutover-holds keeps the source 0.3 s at each point after the pause (downtime, done,
    commit): at the first, before any LOADED, the record already says "committing"."""
    a, b = make_daemon("a", faults="cutover-holds"), make_daemon("b")
    create(a, rate=16)
    assert migration_records(a) == [], "no record before the migration"
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: '"point": "downtime"' in a.log(), what="the source to pause and hold")
    records = migration_records(a)
    assert [r["state"] for r in records] == ["committing"], records
    assert a.call("migration.status", name="vm1")["state"] in ("downtime", "cutover"), "still before COMMIT"
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    assert [r["state"] for r in migration_records(a)] == ["released"]
    assert_runs_here(b, "vm1")
    # The target writes it after RUNNING went out (or failed to): wait for it, do not race it.
    wait_for(lambda: vm_record(b, "vm1").get("state") == "running", what="b's record of vm1 as running")


def test_a_migration_that_ends_before_commit_overwrites_the_commit_record(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    a, b = make_daemon("a"), make_daemon("b", faults="target-refuse-loaded")
    create(a, rate=16)
    stats = migrate(a, b)
    assert stats["state"] == "failed" and "refusing at LOADED" in stats["error"], stats
    assert stats["downtime_ms"] is not None, "the precondition: the VM was paused (the record was written)"
    assert [r["state"] for r in migration_records(a)] == ["resumed-before-commit"]
    assert_runs_here(a, "vm1")
    # What a successor daemon would tell the operator, had this one died now: not the target.
    records = VmRecords(a.workdir / "a-state")
    (lost,) = _recover_as_successor(records, a.workdir / "a-state", "vm1")
    assert "COMMIT" not in lost.detail and b.address not in lost.detail, lost.detail


def _recover_as_successor(records: VmRecords, state_dir: Path, name: str) -> list[Any]:
    """The live record as a dead predecessor would have left it (another pid), recovered."""
    path = state_dir / "vms" / f"{name}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "pid": os.getpid() + 1_000_000}))
    return [lost for lost in records.recover() if lost.name == name]


def test_a_committing_record_sends_the_operator_to_the_target(tmp_path: Path) -> None:
    records = VmRecords(tmp_path)
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "m1.json").write_text(
        json.dumps({"vm": "web", "target": "10.0.0.2:7890", "state": "committing"})
    )
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "web.json").write_text(
        json.dumps({"name": "web", "state": "migrating", "since": 1.0, "pid": os.getpid() + 1})
    )
    (lost,) = records.recover()
    assert "10.0.0.2:7890" in lost.detail and "may be running there" in lost.detail, lost.detail


def test_the_target_records_its_running_vm_after_running_even_when_running_is_lost(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b", faults="target-vanish-after-commit")
    create(a, rate=16)
    a.call("migrate", name="vm1", to=b.address)
    stats = wait_migration(a, "vm1", until=("completed", "failed", "aborted"))
    assert stats["state"] == "completed", stats
    assert '"event": "migration_in_doubt"' in a.log(), "the precondition: RUNNING was lost"
    assert_runs_here(b, "vm1")
    # The target writes it after RUNNING went out (or failed to): wait for it, do not race it.
    wait_for(lambda: vm_record(b, "vm1").get("state") == "running", what="b's record of vm1 as running")


def test_the_guest_downtime_is_reported_beside_the_downtime(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    create(a, rate=16)
    stats = migrate(a, b)
    assert stats["state"] == "completed", stats
    assert isinstance(stats["guest_downtime_ms"], float), stats
    # The target resumed before RUNNING left, and RUNNING took time to arrive.
    assert 0 < stats["guest_downtime_ms"] < stats["downtime_ms"], stats


def test_guest_downtime_arithmetic() -> None:
    # Paused at 10.000 s, COMMIT out at 10.010, RUNNING in at 10.014; the target took 1 ms from
    # COMMIT to RUNNING, resuming 0.2 ms after COMMIT: 3 ms of wire, 1.5 ms each way.
    assert guest_downtime_ms(10.0, 10.010, 10.014, resume_us=200, reply_us=1000) == pytest.approx(11.7)
    assert guest_downtime_ms(10.0, 10.010, 10.014, resume_us=None, reply_us=None) is None
    # A target slower than the round trip measured (clock noise): no negative way there.
    assert guest_downtime_ms(10.0, 10.010, 10.011, resume_us=200, reply_us=5000) == pytest.approx(10.2)


def _timeline(daemon: DaemonProcess, event: str) -> dict[str, float]:
    marks: dict[str, float] = _timeline_event(daemon, event)["marks_ms"]
    return marks


def _timeline_event(daemon: DaemonProcess, event: str) -> dict[str, Any]:
    # Each side logs its timeline once its part is done, which may be after the other side's
    # stats already say "completed" (the target writes its record and joins its streams first).
    wait_for(lambda: f'"event": "{event}"' in daemon.log(), what=f"{daemon.name}'s {event}")
    lines = [json.loads(line) for line in daemon.log().splitlines() if f'"event": "{event}"' in line]
    assert len(lines) == 1, lines
    found: dict[str, Any] = lines[0]
    return found


@pytest.mark.parametrize("rate", [1.0, 64.0])
def test_the_downtime_keeps_r6_order_and_the_target_loads_after_every_end_marker(
    make_daemon: MakeDaemon, rate: float
) -> None:
    """The fine marks of both sides (downtime_timeline, cutover_timeline) in the order R6 and R9
    ask: parked, harvested, the state read, then the state and DONE in one write (verify off),
    the target restoring only once every stream ended and answering RUNNING after it resumed.

    The final pages take one of two ways. A small final set (a guest dirtying 1 MiB/s; the
    final-pages-on-control capability): the streams ended and the target reported them applied
    before the pause (`streams_drained`), the pages go out on the control connection as soon as
    the harvest found them, before the state is read (the target applies them meanwhile, after
    every stream ended), and the state and DONE follow in one write. A bigger one (64 MiB/s,
    when the prediction expects more than CONTROL_FINAL_MAX_PAGES): the pages and their end
    markers are handed to the streams before the state is read."""
    a, b = make_daemon("a", verify="off"), make_daemon("b")
    create(a, rate=rate)
    stats = migrate(a, b)
    assert stats["state"] == "completed", stats.get("error")
    on_control = "streams_drained" in stats["phase_steps_ms"]
    if rate == 1.0:
        assert on_control, stats["phase_steps_ms"]
    source = _timeline(a, "downtime_timeline")
    if on_control:
        order = ["parked", "harvested", "final_pages_sent", "state_read", "state_packed", "state_and_done_sent"]
        assert "pages_started" not in source, "no page went on a data stream in the downtime"
        steps = list(stats["downtime_breakdown_ms"])
        assert steps[:4] == ["pause", "final_harvest", "final_pages", "state_save"], steps
    else:
        order = ["parked", "harvested", "pages_started", "state_read", "state_packed", "state_and_done_sent"]
    assert [source[m] for m in order] == sorted(source[m] for m in order), source
    assert source["loaded_received"] < source["commit_sent"] < source["running_received"], source
    cutover = _timeline_event(b, "cutover_timeline")
    # Two daemons of this version: the flat form (flat-machine-state), restored in its steps.
    assert cutover["state_kind"] == "x86-machine-flat", cutover
    assert set(cutover["restore_steps_ms"]) == {"check", "vcpu_buffers", "vcpu_ioctls", "vm_ioctls", "total"}, cutover
    target = cutover["marks_ms"]
    assert target["streams_ended"] <= target["restored"] <= target["loaded_sent"], target
    if on_control:
        assert target["streams_ended"] <= target["state_received"], target
        # The restore rehearsed once the streams' end was reported, before the pause.
        assert cutover["rehearsal_ms"] is not None and cutover["rehearsal_ms"] > 0, cutover
    assert target["commit_received"] <= target["resumed"] <= target["running_sent"], target
    wait_for(lambda: b.call("migration.status", name="vm1")["state"] == "completed", what="the target's part")
    incoming = b.call("migration.status", name="vm1")
    assert incoming["final_pages"] == stats["final_pages"], (incoming, stats)
    assert incoming["pages_sent"] + incoming["zero_pages"] == stats["pages_sent"] + stats["zero_pages"]


def test_the_streams_end_before_the_state_also_with_no_page_in_the_downtime(make_daemon: MakeDaemon) -> None:
    """A paused guest dirties nothing: no page goes on the control connection, before the pause
    or in it. The target still marks the streams' end where it saw and reported it, before the
    state arrived (it once counted it only at DONE, after the state)."""
    a, b = make_daemon("a", verify="off"), make_daemon("b")
    create(a, rate=1.0)
    a.call("vm.pause", name="vm1")
    stats = migrate(a, b)
    assert stats["state"] == "completed", stats.get("error")
    assert "streams_drained" in stats["phase_steps_ms"], stats["phase_steps_ms"]
    assert stats["final_pages"] == 0, stats
    target = _timeline_event(b, "cutover_timeline")["marks_ms"]
    assert target["streams_ended"] <= target["state_received"] <= target["restored"], target


def test_the_last_harvest_goes_before_the_pause_and_the_final_harvest_behind_it(make_daemon: MakeDaemon) -> None:
    """With the streams ended before the pause (a small final set), the pages of the last
    harvest go on the control connection while the streams drain and the guest still runs; the
    downtime sends what the final harvest found behind them, on the same connection, so a page
    the guest wrote in between lands in its newer copy. The digests match (verify full) and the
    guest, which checks every page it wrote, runs on at the target without an error. Both sides
    count the whole last pass alike."""
    a, b = make_daemon("a"), make_daemon("b")
    create(a, rate=4.0)  # ~1,000 pages/s: dozens dirtied during the bulk copy, a few after
    stats = migrate(a, b)
    assert stats["state"] == "completed", stats.get("error")
    assert "streams_drained" in stats["phase_steps_ms"], stats["phase_steps_ms"]
    assert stats["final_pages_before_pause"] > 0, stats
    assert stats["final_pages"] >= stats["final_pages_before_pause"], stats
    assert_runs_here(b, "vm1")
    wait_for(lambda: b.call("migration.status", name="vm1")["state"] == "completed", what="the target's part")
    assert b.call("migration.status", name="vm1")["final_pages"] == stats["final_pages"]


def test_the_target_has_its_vm_record_on_disk_before_loaded(make_daemon: MakeDaemon) -> None:
    """The target writes its VM record beside the receive, not before its first control read;
    here it takes 0.5 s (fault target-record-slow), far longer than the VM takes to arrive. A
    crash after LOADED must not lose the VM from the record a successor reads: at LOADED (the
    target holds there 0.3 s: cutover-holds) the record says "incoming"."""
    a, b = make_daemon("a"), make_daemon("b", faults="cutover-holds,target-record-slow")
    create(a, rate=16, memory_mib=128, vcpus=1, working_set_mib=32)
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: '"point": "loaded"' in b.log(), what="the target to send LOADED and hold")
    assert vm_record(b, "vm1").get("state") == "incoming", vm_record(b, "vm1")
    stats = wait_migration(a, "vm1")
    assert stats["state"] == "completed", stats
    incoming = wait_migration(b, "vm1")
    assert incoming["phase_steps_ms"]["overlapped.record"] >= 500, incoming  # the fault was on
    assert_runs_here(b, "vm1")
    wait_for(lambda: vm_record(b, "vm1").get("state") == "running", what="b's record of vm1 as running")


def test_a_copy_discarded_while_its_record_is_written_leaves_no_record(make_daemon: MakeDaemon) -> None:
    """The source cancels while the target's record is still being written (0.5 s: fault
    target-record-slow): the discard waits for it and then removes it, so no record outlives
    the discarded copy (a successor would report a VM lost that never was here)."""
    a, b = make_daemon("a"), make_daemon("b", faults="target-record-slow")
    create(a, rate=16, memory_mib=128, vcpus=1, working_set_mib=32)
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: b.events("incoming_vm_accepted"), what="the target to build the VM")
    a.call("migration.cancel", name="vm1")
    stats = wait_migration(a, "vm1")
    assert stats["state"] in ("cancelled", "aborted", "failed"), stats
    assert_runs_here(a, "vm1")
    wait_for(lambda: b.events("incoming_vm_discarded"), what="the target to discard its copy")
    incoming = wait_migration(b, "vm1")
    assert incoming["phase_steps_ms"]["overlapped.record"] >= 500, incoming  # written meanwhile
    assert vm_record(b, "vm1") == {}, vm_record(b, "vm1")
    assert_absent(b, "vm1")


def test_a_target_stopped_while_its_record_is_written_leaves_no_record(make_daemon: MakeDaemon) -> None:
    """The target's daemon stops (SIGTERM) while its record of an incoming copy is still being
    written (0.5 s: fault target-record-slow): the stop waits for the record before it removes
    the copy, so no record outlives it and the next daemon reports no VM lost that never was
    here. The source keeps its VM."""
    a, b = make_daemon("a"), make_daemon("b", faults="target-record-slow")
    create(a, rate=16, memory_mib=128, vcpus=1, working_set_mib=32)
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: b.events("incoming_vm_accepted"), what="the target to build the VM")
    assert b.stop() == 0
    assert vm_record(b, "vm1") == {}, vm_record(b, "vm1")
    stats = wait_migration(a, "vm1")
    assert stats["state"] in ("aborted", "failed"), stats
    assert_runs_here(a, "vm1")
    b.start()
    assert b.call("vm.list", lost=True) == [], "a copy that never ran here is no lost VM"


@pytest.mark.parametrize("rate", [1.0, 64.0])
def test_with_verify_full_the_target_digests_as_soon_as_every_page_is_in(make_daemon: MakeDaemon, rate: float) -> None:
    """The source says verify = full in its description, so the target starts its digest when the
    state arrives (after every stream ended), beside the source's own, not after DONE; the
    digests agree and the migration completes. Both ways of the final pages (see above)."""
    a, b = make_daemon("a"), make_daemon("b")
    create(a, rate=rate)
    stats = migrate(a, b)
    assert stats["state"] == "completed", stats.get("error")
    target = _timeline(b, "cutover_timeline")
    assert target["streams_ended"] <= target["digest_started"] < target["done_received"], target
    assert target["digest_started"] <= target["early_digest_done"] <= target["restored"] <= target["loaded_sent"], (
        target
    )
    assert "worker_entered" not in target, "no worker trip for the digest after DONE"
    wait_for(lambda: b.call("migration.status", name="vm1")["state"] == "completed", what="the target's part")
    assert b.call("migration.status", name="vm1")["digest"] == stats["digest"]
    assert_runs_here(b, "vm1")


def test_target_ram_that_differs_from_the_sources_is_refused_with_verify_full(make_daemon: MakeDaemon) -> None:
    """The target flips a byte of guest RAM once every page is in (fault target-corrupt-ram):
    its early digest differs from the source's, so it refuses before LOADED, discards its copy,
    and the VM runs on at the source."""
    a, b = make_daemon("a"), make_daemon("b", faults="target-corrupt-ram")
    create(a, rate=1.0)
    stats = migrate(a, b)
    assert stats["state"] == "failed", stats
    assert "memory digest mismatch" in stats["error"], stats["error"]
    assert b.events("test_fault_corrupted_ram"), "the fault changed the target's RAM"
    assert_runs_here(a, "vm1")
    wait_for(lambda: "vm1" not in [vm["name"] for vm in b.call("vm.list")], what="the target to discard its copy")
    assert_absent(b, "vm1")
