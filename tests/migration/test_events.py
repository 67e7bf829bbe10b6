"""`migratectl events`: the daemon's events, live, as the log has them (real daemon, real CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import MakeDaemon
from daemons import REPO, DaemonProcess, wait_for, wait_migration
from test_migration import create

pytestmark = pytest.mark.kvm


class Watcher:
    """`migratectl events ARGS` in its own process; its output lines collected as they come."""

    def __init__(self, daemon: DaemonProcess, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "migrated.cli", "--socket", str(daemon.socket), "events", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: daemon.call("daemon.status")["event_subscribers"] == 1, what="events to subscribe")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str) -> None:
        wait_for(lambda: any(text in line for line in self.lines), what=f"an event line with {text!r}")

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C, as an operator types it; returns the exit status and what went to stderr."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        assert self.process.stderr is not None
        return self.process.returncode, self.process.stderr.read()


def test_the_event_stream_shows_a_migration_as_it_happens(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    watcher = Watcher(a, "--json", "--vm", "vm1")
    create(a, memory_mib=64, working_set_mib=16, rate=16)
    a.call("migrate", name="vm1", to=b.address)
    assert wait_migration(a, "vm1")["state"] == "completed"
    create(a, name="other", memory_mib=32, working_set_mib=8)  # another VM: filtered out
    watcher.wait_for_line('"migration_completed"')
    status, err = watcher.interrupt()
    assert status == 0 and "Traceback" not in err, err
    events = [json.loads(line) for line in watcher.lines]
    names = [e["event"] for e in events]
    for expected in ("vm_created", "migration_started", "bulk_copy_done", "converged", "migration_completed"):
        assert expected in names, names
    assert names.index("migration_started") < names.index("migration_completed")
    assert all(e.get("vm") == "vm1" for e in events), [e for e in events if e.get("vm") != "vm1"]
    assert all("timestamp" in e and "level" in e for e in events)


def test_a_human_reader_gets_one_line_per_event_and_ctrl_c_is_quiet(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    watcher = Watcher(a)
    create(a, name="web", memory_mib=32, working_set_mib=8)
    a.call("vm.pause", name="web")
    watcher.wait_for_line(" vm_paused ")
    status, err = watcher.interrupt()
    assert status == 0 and err == "", err
    assert any(" vm_created " in line and "vm=web" in line for line in watcher.lines), watcher.lines
    wait_for(lambda: a.call("daemon.status")["event_subscribers"] == 0, what="the subscription to close")
