"""The daemon as systemd runs it, and migratectl as an operator types it (real processes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys

from pathlib import Path

import pytest

from daemons import MakeDaemon, write_config
from helpers import write_key
from daemons import REPO, DaemonProcess, wait_for
from test_migration import assert_runs_here

pytestmark = pytest.mark.kvm


def migratectl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrated.cli", "--socket", str(daemon.socket), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )


def test_notify_protocol_ready_reload_stopping(tmp_path: Path) -> None:
    """A datagram socket stands in for systemd's: READY=1 only once both sockets listen,
    RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 on SIGTERM, and a clean exit."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(20)
    key = write_key(tmp_path / "peer.key")
    config = write_config(tmp_path / "d.toml")
    daemon = DaemonProcess("d", tmp_path, key, extra_args=("--config", str(config)))
    os.environ["NOTIFY_SOCKET"] = str(notify_path)
    try:
        daemon.start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        messages = []
        while not any(b"READY=1" in m for m in messages):
            messages.append(notify.recv(4096))
        # READY came after the sockets: the control socket answers and the peer port accepts.
        assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
        socket.create_connection(("127.0.0.1", daemon.port), timeout=5).close()
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        reload: list[bytes] = []
        while len(reload) < 2:
            message = notify.recv(4096)
            if not message.startswith(b"STATUS="):
                reload.append(message)
        assert reload[0].startswith(b"RELOADING=1") and b"MONOTONIC_USEC=" in reload[0], reload
        assert reload[1].startswith(b"READY=1"), reload
        daemon.process.send_signal(signal.SIGTERM)
        while b"STOPPING=1" not in (message := notify.recv(4096)):
            pass
        assert daemon.process.wait(timeout=20) == 0
        assert not daemon.socket.exists(), "the control socket is removed on a clean stop"
    finally:
        daemon.stop()
        notify.close()


def test_sigterm_with_a_running_vm_stops_cleanly(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    a.call("vm.create", name="vm1", memory_mib=64, vcpus=1, dirty_rate_mib_s=8, working_set_mib=8)
    assert a.stop() == 0
    assert '"event": "vm_removed"' in a.log() and '"event": "daemon_stopped"' in a.log()


def test_bad_config_names_file_key_and_allowed(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[migration]\ndowntime_limit_ms = -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "migrated", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    assert str(config) in result.stderr and "migration.downtime_limit_ms" in result.stderr
    assert "allowed" in result.stderr


def test_operator_cli_end_to_end(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    created = migratectl(
        a, "vm", "create", "web", "--memory", "256", "--vcpus", "2", "--dirty-rate", "32", "--working-set", "64"
    )
    assert created.returncode == 0, created.stderr
    listed = json.loads(migratectl(a, "vm", "list", "--json").stdout)
    assert [vm["name"] for vm in listed] == ["web"]
    shown = json.loads(migratectl(a, "vm", "show", "web", "--json").stdout)
    assert shown["dirty_tracking"] == "ring" and shown["guest"]["verification_errors"] == 0
    moved = migratectl(a, "migrate", "web", "--to", b.address, "--downtime-limit", "300", "--wait")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "state: completed" in moved.stdout and "downtime_ms:" in moved.stdout
    assert "round" in moved.stderr, "the live progress line goes to stderr"
    status = json.loads(migratectl(a, "migration", "status", "web", "--json").stdout)
    for key in (
        "state",
        "total_ms",
        "setup_ms",
        "downtime_ms",
        "bytes_sent",
        "pages_sent",
        "zero_pages",
        "rounds",
        "bandwidth_mib_s",
        "dirty_rate_mib_s",
        "verify_ms",
        "dirty_tracking",
        "backup_bitmap",
    ):
        assert key in status, key
    assert status["state"] == "completed"
    assert_runs_here(b, "web")
    # A migration that cannot complete: exit status 1, and the VM still runs where it was.
    failed = migratectl(b, "migrate", "web", "--to", "127.0.0.1:1", "--wait")
    assert failed.returncode == 1 and "state: failed" in failed.stdout, failed.stdout
    assert_runs_here(b, "web")
    stopped = migratectl(b, "vm", "stop", "web")
    assert stopped.returncode == 0
    assert json.loads(migratectl(b, "vm", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("vm", "show", "nothing"), "no VM named 'nothing'"),
        (("migrate", "nothing", "--to", "127.0.0.1:7"), "no VM named 'nothing'"),
        (("vm", "create", "x y", "--memory", "64"), "VM name 'x y'"),
        (("vm", "create", "big", "--memory", "64", "--working-set", "64"), "does not fit"),
    ],
)
def test_cli_errors_name_the_problem(make_daemon: MakeDaemon, args: tuple[str, ...], message: str) -> None:
    a = make_daemon("a")
    result = migratectl(a, *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_cli_without_a_daemon_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "migrated.cli", "--socket", str(tmp_path / "none.sock"), "vm", "list"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1 and "no daemon at" in result.stderr


def test_migrate_to_bad_address_is_refused(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    a.call("vm.create", name="vm1", memory_mib=64, vcpus=1, dirty_rate_mib_s=0, working_set_mib=8)
    result = migratectl(a, "migrate", "vm1", "--to", "no-port-here")
    assert result.returncode == 1 and "HOST:PORT" in result.stderr
    wait_for(lambda: a.call("vm.show", name="vm1")["state"] == "running", what="vm1 running")
