"""migratectl and migrated as an operator meets them: real daemons, real processes, no traceback.

Each test runs the programs as subprocesses, the way a shell would, and reads what the operator
reads: the exit status, stdout and stderr.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MakeDaemon, write_key
from daemons import REPO, DaemonProcess, wait_for, wait_migration
from migrated.control import RequestError

pytestmark = pytest.mark.kvm

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def migratectl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrated.cli", "--socket", str(daemon.socket), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=120,
    )


def assert_one_line_error(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"


def test_daemon_status(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    result = migratectl(a, "daemon", "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["listen"] == a.address
    assert status["control_socket"] == str(a.socket)
    assert status["vms"] == 0
    human = migratectl(a, "daemon", "status")
    assert human.returncode == 0 and f"listen: {a.address}" in human.stdout, human


def test_ctrl_c_on_wait_stops_watching_and_the_migration_goes_on(make_daemon: MakeDaemon) -> None:
    """SIGINT to a `migrate --wait` that is printing progress: it says the migration goes on and
    how to cancel it, exits 130, and the migration really is still going (then cancelled here)."""
    a, b = make_daemon("a"), make_daemon("b")
    created = migratectl(a, "vm", "create", "web", "--memory", "256", "--dirty-rate", "8", "--working-set", "128")
    assert created.returncode == 0, created.stderr
    # Let the guest touch 32 MiB of its working set first: the bulk copy sends only RAM that
    # holds data, and a guest that had written a few MiB was copied (and the migration done)
    # before the SIGINT's watcher had said its piece (seen once in CI).
    wait_for(
        lambda: a.call("vm.show", name="web")["memory_allocated_bytes"] >= 32 << 20,
        timeout=120,
        what="the guest to write 32 MiB",
    )
    # 4 MiB/s keeps the copy of 32 MiB or more going for 8 s, far longer than the test needs it.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "migrated.cli", "--socket", str(a.socket), "migrate", "web"]
        + ["--to", b.address, "--max-bandwidth", "4", "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    try:
        assert watcher.stderr is not None
        first = watcher.stderr.readline()  # a progress line: it is inside the watch loop
        assert first.split()[0] in ("setup", "bulk", "rounds"), first
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 130, (watcher.returncode, out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "stopped watching" in err and "goes on" in err, err
    assert "migratectl migration cancel web" in err, err
    status = a.call("migration.status", name="web")
    assert status["state"] in ("setup", "bulk", "rounds"), status
    cancelled = migratectl(a, "migration", "cancel", "web")
    assert cancelled.returncode == 0, cancelled.stderr
    final = wait_migration(a, "web")
    assert final["state"] == "cancelled", final
    assert a.call("vm.show", name="web")["state"] == "running"


def test_closed_pipe_is_quiet(make_daemon: MakeDaemon) -> None:
    """`migratectl vm show web | head -0`: the reader is gone before anything is written."""
    a = make_daemon("a")
    assert migratectl(a, "vm", "create", "web", "--memory", "64").returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "migrated.cli", "--socket", str(a.socket), "vm", "show", "web"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=ENV,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.stderr == "", result.stderr
    assert result.returncode != 0


def test_address_in_use_names_the_address(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    a = make_daemon("a")
    key = write_key(tmp_path / "second.key")
    result = subprocess.run(
        [sys.executable, "-m", "migrated", "--control-socket", str(tmp_path / "second.sock")]
        + ["--listen", a.address, "--state-dir", str(tmp_path / "second-state"), "--peer-key-file", str(key)]
        + ["--log-level", "error"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert_one_line_error(result.stderr)
    assert f"cannot listen for peers on {a.address} (peer.listen)" in result.stderr, result.stderr
    assert "Address already in use" in result.stderr, result.stderr
    assert a.alive(), "the first daemon keeps serving"
    # The peer listener comes before the control socket: a daemon that cannot serve peers never
    # answered a client as if it could.
    assert not (tmp_path / "second.sock").exists()


def test_the_control_socket_answers_only_once_peers_can_connect(make_daemon: MakeDaemon) -> None:
    """A client that reached the control socket finds the peer listener listening and the
    migration commands known (a test once connected to the peer port right after its first
    status reply and was refused, under load): the daemon logs peer_listening before
    control_listening, and `migration.status` is a command from the first reply on."""
    a = make_daemon("a")
    names = [event["event"] for event in map(json.loads, a.log().splitlines()) if "event" in event]
    assert names.index("peer_listening") < names.index("control_listening"), names
    with pytest.raises(RequestError) as refused:
        a.call("migration.status", name="nothing-here")
    assert "unknown command" not in str(refused.value), refused.value
    host, port = a.address.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=10).close()


@pytest.mark.parametrize(
    "to,cause",
    [("no-such-host.invalid:7890", "Name or service not known"), ("127.0.0.1:1", "Connection refused")],
)
def test_failed_connect_names_the_peer_and_the_cause(make_daemon: MakeDaemon, to: str, cause: str) -> None:
    a = make_daemon("a")
    assert migratectl(a, "vm", "create", "web", "--memory", "64").returncode == 0
    result = migratectl(a, "migrate", "web", "--to", to, "--wait")
    assert result.returncode == 1, result
    assert f"error: cannot connect to the peer {to}: {cause}" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
    assert a.call("vm.show", name="web")["state"] == "running"


def test_no_daemon_is_one_line(tmp_path: Path) -> None:
    socket = tmp_path / "absent.sock"
    result = subprocess.run(
        [sys.executable, "-m", "migrated.cli", "--socket", str(socket), "vm", "list"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=60,
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr)
    assert str(socket) in result.stderr


def test_log_level_on_the_command_line(tmp_path: Path) -> None:
    """--log-level warning: a whole start and clean stop writes no info event; with debug the
    same run writes them (the log is read after the process ended, so it is complete)."""
    key = write_key(tmp_path / "peer.key")
    quiet = DaemonProcess("quiet", tmp_path, key, extra_args=("--log-level", "warning")).start()
    assert quiet.call("daemon.status")["vms"] == 0
    assert quiet.stop() == 0
    assert '"level": "info"' not in quiet.log(), quiet.log()
    loud = DaemonProcess("loud", tmp_path, key, extra_args=("--log-level", "debug")).start()
    assert loud.stop() == 0
    assert '"event": "daemon_ready"' in loud.log() and '"event": "daemon_stopped"' in loud.log(), loud.log()


def _daemon_with(tmp_path: Path, name: str, key: Path, vm_keys: str) -> DaemonProcess:
    config = tmp_path / f"{name}.toml"
    config.write_text(f"[peer]\nconnect_timeout_s = 3\n[vm]\n{vm_keys}\n")
    return DaemonProcess(name, tmp_path, key, extra_args=("--config", str(config))).start()


def test_overcommit_warns_then_refuses(tmp_path: Path) -> None:
    """Factors set low so that small VMs cross them on any host: vCPUs past the host's CPUs warn,
    past the factor are refused; memory past its factor is refused. The daemon serves on."""
    cpus = len(os.sched_getaffinity(0))
    key = write_key(tmp_path / "peer.key")
    a = _daemon_with(tmp_path, "a", key, "max_vcpu_overcommit = 2\nmax_memory_overcommit = 0.1")
    try:
        warned = migratectl(a, "vm", "create", "one", "--memory", "64", "--vcpus", str(cpus + 1), "--working-set", "8")
        assert warned.returncode == 0, warned.stderr
        assert "migratectl: warning: VM one: this daemon's VMs would have" in warned.stderr, warned.stderr
        assert f"times the host's {cpus} CPUs" in warned.stderr, warned.stderr
        refused = migratectl(a, "vm", "create", "two", "--memory", "64", "--vcpus", str(cpus), "--working-set", "8")
        assert refused.returncode == 1
        assert_one_line_error(refused.stderr)
        assert "VM two:" in refused.stderr and "vm.max_vcpu_overcommit allows 2 times: refused" in refused.stderr
        host_mib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) // 1024
        big = str(((host_mib // 5) // 2) * 2)  # 0.2 times the host's RAM, past the factor 0.1
        too_big = migratectl(a, "vm", "create", "big", "--memory", big, "--working-set", "8")
        assert too_big.returncode == 1
        assert "vm.max_memory_overcommit allows 0.1 times: refused" in too_big.stderr, too_big.stderr
        names = [vm["name"] for vm in json.loads(migratectl(a, "vm", "list", "--json").stdout)]
        assert names == ["one"]
        assert '"event": "overcommit"' in a.log()
    finally:
        a.stop()


def test_target_refuses_an_incoming_vm_past_its_factor(tmp_path: Path) -> None:
    key = write_key(tmp_path / "peer.key")
    a = _daemon_with(tmp_path, "a", key, "")
    b = _daemon_with(tmp_path, "b", key, "max_vcpu_overcommit = 0.4")  # under one vCPU per 2 CPUs
    try:
        cpus = len(os.sched_getaffinity(0))
        vcpus = str(max(1, int(cpus * 0.4) + 1))
        assert migratectl(a, "vm", "create", "web", "--memory", "64", "--vcpus", vcpus).returncode == 0
        moved = migratectl(a, "migrate", "web", "--to", b.address, "--wait")
        assert moved.returncode == 1, moved
        assert "VM web:" in moved.stdout and "vm.max_vcpu_overcommit allows 0.4 times: refused" in moved.stdout
        assert a.call("vm.show", name="web")["state"] == "running"
        assert b.call("vm.list") == []
    finally:
        a.stop()
        b.stop()


def test_wait_without_a_terminal_prints_changes_then_a_rounded_summary(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    assert migratectl(a, "vm", "create", "web", "--memory", "128", "--dirty-rate", "16").returncode == 0
    moved = migratectl(a, "migrate", "web", "--to", b.address, "--wait")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    progress = [line for line in moved.stderr.splitlines() if line.strip()]
    assert progress, "no progress line at all"
    moving = [line.split("  elapsed")[0] for line in progress]
    repeats = [x for x, y in zip(moving, moving[1:]) if x == y]
    assert not repeats, f"lines repeated although nothing moved:\n{moved.stderr}"
    assert all("/128.0 MiB" in line for line in progress), moved.stderr
    summary = dict(line.split(": ", 1) for line in moved.stdout.splitlines())
    assert summary["state"] == "completed" and summary["role"] == f"source (to {b.address})"
    for key in ("total_ms", "setup_ms", "bandwidth_mib_s", "dirty_rate_mib_s"):
        whole, _, decimals = summary[key].partition(".")
        assert whole.isdigit() and len(decimals) == 1, (key, summary[key])
    assert summary["downtime_ms"].split(" ")[1:3] == ["(limit", "300)"], summary["downtime_ms"]
    assert summary["backup_bitmap"].endswith("docs/design.md)"), summary["backup_bitmap"]
    on_target = migratectl(b, "migration", "status", "web")
    assert on_target.returncode == 0 and "role: target (from 127.0.0.1:" in on_target.stdout, on_target.stdout


def test_vm_list_columns_fit_long_names_and_show_mib(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    long_name = "a-name-well-over-twenty-characters"
    assert migratectl(a, "vm", "create", long_name, "--memory", "64").returncode == 0
    assert migratectl(a, "vm", "create", "web", "--memory", "128").returncode == 0
    listed = migratectl(a, "vm", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert len(rows) == 2
    state_at = header.index("STATE")
    for row in rows:
        name = row.split()[0]
        assert row[state_at - 2 : state_at] == "  " and row[state_at] != " ", f"misaligned:\n{listed.stdout}"
        assert name in (long_name, "web")
    assert " 64 MiB " in listed.stdout and "128 MiB" in listed.stdout, listed.stdout
    shown = migratectl(a, "vm", "show", "web")
    assert "memory: 128 MiB" in shown.stdout, shown.stdout


def test_daemon_start_failure_on_a_path_is_one_line_naming_it(tmp_path: Path) -> None:
    key = write_key(tmp_path / "peer.key")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    result = subprocess.run(
        [sys.executable, "-m", "migrated", "--control-socket", str(blocker / "control.sock")]
        + ["--state-dir", str(tmp_path / "state"), "--peer-key-file", str(key), "--log-level", "error"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert_one_line_error(result.stderr)
    assert result.stderr.startswith(f"migrated: {blocker}: "), result.stderr
    assert "[Errno" not in result.stderr, result.stderr
