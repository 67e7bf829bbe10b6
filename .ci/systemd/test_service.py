"""migrated as a systemd service, inside the systemd lane's container (.ci/systemd/lane).

systemd is PID 1 here; systemd/migrated.service runs as shipped, twice: migrated.service with
/etc/migrated/migrated.toml, migrated-b.service with a drop-in for its own config, runtime and
state directories (.ci/systemd/inside sets them up). The tests run in file order and share the
two running daemons: a later test (the migration, the stop) builds on what the earlier ones left.
Every wait has a deadline and names what it waited for.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

A, B = "migrated", "migrated-b"
SOCKET = {A: Path("/run/migrated/control.sock"), B: Path("/run/migrated-b/control.sock")}
CONFIG = {A: Path("/etc/migrated/migrated.toml"), B: Path("/etc/migrated/b.toml")}
B_PEER = "127.0.0.1:7891"
T = TypeVar("T")


def run(*command: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    if user is not None:
        command = ("runuser", "-u", user, "--", *command)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def show(unit: str) -> dict[str, str]:
    """`systemctl show` of the unit as a dict."""
    out = run("systemctl", "show", f"{unit}.service").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def ctl(unit: str, *args: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("migratectl", "--socket", str(SOCKET[unit]), *args, user=user, check=check)


def ctl_json(unit: str, *args: str) -> Any:
    return json.loads(ctl(unit, *args, "--json").stdout)


def journal(unit: str, since_cursor: str | None = None) -> list[dict[str, Any]]:
    """The unit's journal entries (journalctl -o json), oldest first."""
    command = ["journalctl", "--no-pager", "-o", "json", "-u", f"{unit}.service"]
    if since_cursor:
        command += ["--after-cursor", since_cursor]
    return [json.loads(line) for line in run(*command).stdout.splitlines() if line.strip()]


def events(entries: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(journal entry, the daemon's JSON event in its MESSAGE) for each of the daemon's lines."""
    found = []
    for entry in entries:
        message = entry.get("MESSAGE")
        if not isinstance(message, str) or not message.startswith("{"):
            continue
        try:
            found.append((entry, json.loads(message)))
        except json.JSONDecodeError:
            continue
    return found


def cursor(unit: str) -> str:
    entries = journal(unit)
    assert entries, f"{unit} has no journal entries yet"
    return str(entries[-1]["__CURSOR"])


def wait_event(unit: str, name: str, after: str | None, **fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    def probe() -> tuple[dict[str, Any], dict[str, Any]] | None:
        for entry, event in events(journal(unit, after)):
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return entry, event
        return None

    return wait_for(f"{name} {fields} in the journal of {unit}", probe)


@pytest.fixture(scope="module", autouse=True)
def services() -> Iterator[None]:
    for tool in ("systemctl", "journalctl", "migrated", "migratectl", "runuser"):
        assert shutil.which(tool), f"{tool} is missing in the container"
    assert Path("/dev/kvm").exists(), "/dev/kvm is not in the container (--bind=/dev/kvm)"
    assert Path("/proc/1/comm").read_text().strip() == "systemd", "PID 1 is not systemd"
    # `systemctl start` of a Type=notify unit returns once READY=1 arrived (or fails).
    run("systemctl", "start", f"{A}.service", f"{B}.service")
    yield
    for unit in (A, B):
        run("systemctl", "stop", f"{unit}.service", check=False)


# --- READY, STATUS, the watchdog -----------------------------------------------------------


@pytest.mark.parametrize("unit", [A, B])
def test_ready_and_status(unit: str) -> None:
    s = show(unit)
    assert (s["ActiveState"], s["SubState"]) == ("active", "running"), s
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    # STATUS= from the daemon (daemon.update_status), not one of systemd's own.
    assert s["StatusText"].startswith("0 VMs, 0 running, 0 migrations"), s["StatusText"]
    assert "WARNING" not in s["StatusText"], s["StatusText"]
    assert SOCKET[unit].is_socket()
    wait_event(unit, "daemon_ready", None, control_socket=str(SOCKET[unit]))


def test_the_watchdog_is_armed_and_fed() -> None:
    """WatchdogSec=30: systemd records each WATCHDOG=1 it accepts; the service is not killed."""
    before = show(A)
    assert before["WatchdogUSec"] == "30s", before["WatchdogUSec"]
    pid, fed = before["MainPID"], int(before["WatchdogTimestampMonotonic"])
    # The daemon pings every WATCHDOG_USEC/2 = 15 s: a new timestamp must come within 30 s.
    after = wait_for(
        "a WATCHDOG=1 ping newer than the last one",
        lambda: s if int((s := show(A))["WatchdogTimestampMonotonic"]) > fed else None,
        timeout=45,
    )
    assert after["MainPID"] == pid and after["ActiveState"] == "active"
    assert after["NRestarts"] == "0" and after["Result"] == "success", after


# --- operators: the control socket's group --------------------------------------------------


def test_the_socket_belongs_to_the_operators_group() -> None:
    for unit in (A, B):
        sock, directory = SOCKET[unit].stat(), SOCKET[unit].parent.stat()
        assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == grp.getgrnam("migrated").gr_gid, unit
        assert stat.S_IMODE(directory.st_mode) == 0o750 and directory.st_gid == grp.getgrnam("migrated").gr_gid, unit


def test_migratectl_as_a_member_of_the_group() -> None:
    assert os.getuid() == 0
    assert "ops" in grp.getgrnam("migrated").gr_mem and "outsider" not in grp.getgrnam("migrated").gr_mem
    listed = json.loads(ctl(A, "vm", "list", "--json", user="ops").stdout)
    assert (listed["vms"] if isinstance(listed, dict) else listed) == []  # nothing created yet
    refused = ctl(A, "vm", "list", user="outsider", check=False)
    assert refused.returncode != 0
    assert "permission" in refused.stderr.lower() and "Traceback" not in refused.stderr, refused.stderr


# --- the harvester's real-time priority under the unit's hardening --------------------------


def test_the_ring_harvester_is_real_time_under_the_units_hardening() -> None:
    ctl(A, "vm", "create", "web", "--memory", "64", "--working-set", "8", "--dirty-rate", "10",
        "--dirty-tracking", "ring", user="ops")  # fmt: skip
    shown = wait_for(
        "the harvester of web to start",
        lambda: (
            v
            if (v := ctl_json(A, "vm", "show", "web")).get("tracker", {}).get("harvester_realtime") is not None
            else None
        ),
    )
    assert shown["tracker"]["harvester_realtime"] is True, shown
    assert shown["state"] == "running", shown
    assert not [e for _, e in events(journal(A)) if e.get("event") == "harvester_realtime_unavailable"]
    # The unit lets a downtime keep idle CPUs polling (DeviceAllow=/dev/cpu_dma_latency).
    assert ctl_json(A, "daemon", "status")["downtime_idle_polling"] is True
    assert not [e for _, e in events(journal(A)) if e.get("event") == "cpu_latency_unavailable"]
    status = wait_for("STATUS to count the VM", lambda: s if (s := show(A))["StatusText"].startswith("1 VMs") else None)
    assert "1 running" in status["StatusText"]


# --- reload and the journal's priorities ----------------------------------------------------


def test_reload_is_sighup_and_logged() -> None:
    pid = show(A)["MainPID"]
    mark = cursor(A)
    run("systemctl", "reload", f"{A}.service")
    entry, event = wait_event(A, "config_reloaded", mark, changes=0)
    assert entry["_PID"] == pid and event["source"] == str(CONFIG[A])
    s = show(A)
    assert s["MainPID"] == pid and s["ActiveState"] == "active", s
    # systemd re-created the runtime directory's mode for `kill`; operators still get in.
    test_the_socket_belongs_to_the_operators_group()
    ctl(A, "vm", "list", user="ops")


def test_journal_fields_and_priority_per_level() -> None:
    """info -> 6, warning -> 4, error -> 3: the daemon's `<N>` prefixes reach journald."""
    pid = show(A)["MainPID"]
    original = CONFIG[A].read_text()
    try:
        # warning: a key that needs a restart changed.
        mark = cursor(A)
        CONFIG[A].write_text(original.replace('listen = "0.0.0.0:7890"', 'listen = "0.0.0.0:7899"'))
        run("systemctl", "reload", f"{A}.service")
        warning_entry, _ = wait_event(A, "config_change_needs_restart", mark, key="peer.listen")
        info_entry, _ = wait_event(A, "config_reloaded", mark)
        # error: a file that does not load is refused as a whole.
        mark = cursor(A)
        CONFIG[A].write_text(original + "\n[daemon\n")
        run("systemctl", "reload", f"{A}.service")
        error_entry, error = wait_event(A, "config_reload_refused", mark)
    finally:
        CONFIG[A].write_text(original)
        run("systemctl", "reload", f"{A}.service")
    assert str(CONFIG[A]) in error["error"]
    assert (info_entry["PRIORITY"], warning_entry["PRIORITY"], error_entry["PRIORITY"]) == ("6", "4", "3")
    for entry in (info_entry, warning_entry, error_entry):
        assert entry["_SYSTEMD_UNIT"] == f"{A}.service" and entry["_PID"] == pid
        assert entry["SYSLOG_IDENTIFIER"] == "migrated", entry
        assert not entry["MESSAGE"].startswith("<"), "journald kept the priority prefix in MESSAGE"
    # Every line the daemon wrote is JSON with a level that matches its PRIORITY.
    priority = {"debug": "7", "info": "6", "warning": "4", "error": "3", "critical": "2"}
    lines = events(journal(A))
    assert len(lines) >= 5
    mismatched = [
        (e["PRIORITY"], ev["level"], ev["event"]) for e, ev in lines if e["PRIORITY"] != priority[ev["level"]]
    ]
    assert not mismatched, mismatched
    assert show(A)["ActiveState"] == "active"


# --- a live migration between the two instances ---------------------------------------------


def test_live_migration_between_the_two_services() -> None:
    assert ctl_json(A, "vm", "show", "web")["state"] == "running"
    result = ctl(A, "migrate", "web", "--to", B_PEER, "--wait", user="ops")
    assert result.returncode == 0
    status = ctl_json(A, "migration", "status", "web")
    assert status["state"] == "completed", status
    on_b = wait_for(
        "web to run on migrated-b", lambda: v if (v := ctl_json(B, "vm", "show", "web"))["state"] == "running" else None
    )
    assert on_b["name"] == "web"
    wait_for(
        "web to leave migrated",
        lambda: not any(vm.get("name") == "web" for vm in vm_list(A)) or None,
    )
    # The guest goes on: its heartbeat moves on the target.
    beat = on_b["guest"]["heartbeat_generation"]
    wait_for(
        "the guest's heartbeat on migrated-b",
        lambda: ctl_json(B, "vm", "show", "web")["guest"]["heartbeat_generation"] > beat,
    )
    for unit in (A, B):
        assert show(unit)["NRestarts"] == "0"


def test_huge_page_ram_from_the_units_tmpfs_migrates_between_the_services() -> None:
    """vm.memory_backing "shmem-huge" on the tmpfs the unit mounts (TemporaryFileSystem=; the
    daemon may not mount), on both sides of a live migration."""
    ctl(A, "vm", "create", "huge", "--memory", "64", "--working-set", "8", "--dirty-rate", "10",
        "--memory-backing", "shmem-huge", user="ops")  # fmt: skip
    assert ctl_json(A, "vm", "show", "huge")["memory_backing"] == "shmem-huge"
    result = ctl(A, "migrate", "huge", "--to", B_PEER, "--target-memory-backing", "shmem-huge", "--wait", user="ops")
    assert result.returncode == 0
    on_b = wait_for(
        "huge to run on migrated-b",
        lambda: v if (v := ctl_json(B, "vm", "show", "huge"))["state"] == "running" else None,
    )
    assert on_b["memory_backing"] == "shmem-huge" and on_b["guest"]["verification_errors"] == 0, on_b
    ctl(B, "vm", "stop", "huge", user="ops")


def vm_list(unit: str) -> list[dict[str, Any]]:
    listed = ctl_json(unit, "vm", "list")
    return list(listed["vms"] if isinstance(listed, dict) else listed)


# --- a clean stop ---------------------------------------------------------------------------


def test_a_clean_stop() -> None:
    """migrated-b holds the migrated VM: SIGTERM stops it cleanly, exit 0, nothing left."""
    mark = cursor(B)
    run("systemctl", "stop", f"{B}.service")
    s = show(B)
    # Result=success: the main process exited with 0, neither a signal nor the stop timeout ended it.
    assert (s["ActiveState"], s["Result"], s["ExecMainStatus"]) == ("inactive", "success", "0"), s
    stopping = [e for _, e in events(journal(B, mark)) if e.get("event") in ("daemon_stopping", "daemon_stopped")]
    assert [e["event"] for e in stopping] == ["daemon_stopping", "daemon_stopped"], stopping
    assert not SOCKET[B].exists() and not SOCKET[B].parent.exists()  # RuntimeDirectory removed
    assert show(A)["ActiveState"] == "active"
