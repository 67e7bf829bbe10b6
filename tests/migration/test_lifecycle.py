"""Lifecycle honesty: `vm create` answers only once the guest ran or failed, and a VM that stops
unexpectedly says why, once, in an event and in `vm show` (real daemon, real migratectl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import MakeDaemon
from daemons import wait_for
from test_daemon_service import migratectl

pytestmark = pytest.mark.kvm


def test_a_guest_that_fails_at_once_fails_vm_create(make_daemon: MakeDaemon) -> None:
    """`--guest none` starts at the reset vector in an empty RAM: KVM gives up at once."""
    a = make_daemon("a")
    created = migratectl(a, "vm", "create", "n1", "--memory", "16", "--guest", "none")
    assert created.returncode != 0, created
    assert "failed as it started" in created.stderr and "vCPU 0" in created.stderr, created.stderr
    shown = json.loads(migratectl(a, "vm", "show", "n1", "--json").stdout)
    assert shown["state"] == "failed" and shown["error"], shown
    assert shown["stopped_at"] is not None
    log = a.log()
    assert log.count('"event": "vm_stopped_unexpectedly"') == 1, log
    assert '"vm": "n1"' in log
    stopped = migratectl(a, "vm", "stop", "n1")
    assert stopped.returncode == 0, stopped.stderr
    assert "n1" not in [v["name"] for v in a.call("vm.list")]


def test_a_raw_guest_that_faults_at_once_fails_vm_create(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """`ud2` at the entry with no IDT: #UD, then a double and a triple fault; the VM is gone at once."""
    a = make_daemon("a")
    image = tmp_path / "ud2.bin"
    image.write_bytes(b"\x0f\x0b" + bytes(508) + b"\x55\xaa")
    created = migratectl(
        a, "vm", "create", "r8", "--memory", "16", "--guest", "raw", "--image", str(image), "--entry", "long"
    )
    assert created.returncode != 0, created
    assert "failed as it started" in created.stderr, created.stderr
    assert json.loads(migratectl(a, "vm", "show", "r8", "--json").stdout)["state"] == "failed"
    assert '"event": "vm_stopped_unexpectedly"' in a.log()


def test_a_healthy_guest_is_created_running_with_its_first_heartbeat(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    created = migratectl(a, "vm", "create", "ok", "--memory", "32", "--json")
    assert created.returncode == 0, created.stderr
    shown = json.loads(created.stdout)
    assert shown["state"] == "running", shown
    assert shown["guest"]["heartbeat_generation"] > 0, "created means the guest ran"
    wait_for(lambda: a.call("vm.show", name="ok")["guest"]["heartbeat_generation"] > 5, what="heartbeats")
    assert '"event": "vm_stopped_unexpectedly"' not in a.log()
