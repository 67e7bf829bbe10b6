"""A daemon out of file descriptors goes on (DESIGN 6, issue 10): accept() failing with EMFILE
on the peer port or the control socket is backed off and retried, logged once per episode, and
once fds are free again the daemon serves and migrates as before."""

from __future__ import annotations

import os
import resource
import socket
from typing import Any

import pytest

from conftest import MakeDaemon
from daemons import DaemonProcess, wait_for, wait_migration

pytestmark = pytest.mark.kvm

SMALL_VM: dict[str, Any] = {"memory_mib": 64, "vcpus": 1, "working_set_mib": 8, "dirty_rate_mib_s": 8}
# fds the daemon may open beyond those it has when the limit is set: enough for a migration of
# SMALL_VM (VM, vCPU, memfd, eventfds, the peer socket), far fewer than the flood.
HEADROOM_FDS = 48
FLOOD = 200


def limit_fds(daemon: DaemonProcess) -> int:
    assert daemon.process is not None
    pid = daemon.process.pid
    limit = len(os.listdir(f"/proc/{pid}/fd")) + HEADROOM_FDS
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    assert resource.prlimit(pid, resource.RLIMIT_NOFILE) == (limit, limit)
    return limit


def flood(address: str, count: int) -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=10)
        socks.append(sock)
    return socks


def heartbeat(daemon: DaemonProcess, name: str) -> int:
    return int(daemon.call("vm.show", name=name)["guest"]["heartbeat_generation"])


@pytest.mark.parametrize("through", ["peer port", "control socket"])
def test_fd_exhaustion_is_survived_and_the_daemon_migrates_after(make_daemon: MakeDaemon, through: str) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    b.call("vm.create", name="resident", **SMALL_VM)
    wait_for(lambda: heartbeat(b, "resident") > 0, what="the resident's first heartbeat")
    limit = limit_fds(b)
    assert b.process is not None
    open_fds = f"/proc/{b.process.pid}/fd"
    if through == "peer port":
        socks = flood(b.address, FLOOD)
    else:
        socks = []
        for _ in range(FLOOD):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            socks.append(sock)
            try:
                sock.connect(str(b.socket))
            except BlockingIOError:
                break  # the backlog is full: B accepts no more, as it should when out of fds
    try:
        wait_for(lambda: len(os.listdir(open_fds)) >= limit, timeout=30, what=f"B to use all its {limit} fds")
        if through == "peer port":
            # Asked while out of fds: answered once B's peer timeout frees some (the control
            # listener hitting EMFILE once ended the daemon).
            assert b.call("daemon.status")["vms"] == 1
        assert b.alive(), b.log()[-4000:]
    finally:
        for sock in socks:
            sock.close()
    # The flood is gone (closed, or timed out by B): B answers, its VM ran on, and it migrates.
    status = b.call("daemon.status")
    assert status["vms"] == 1, status
    before = heartbeat(b, "resident")
    wait_for(lambda: heartbeat(b, "resident") > before + 5, what="the resident's heartbeat to rise")
    # An idle guest: this test is about fds, not convergence on a loaded machine.
    a.call("vm.create", name="mover", **{**SMALL_VM, "dirty_rate_mib_s": 0})
    wait_for(lambda: heartbeat(a, "mover") > 0, what="the mover's first heartbeat")
    a.call("migrate", name="mover", to=b.address, downtime_limit_ms=10000)
    stats = wait_migration(a, "mover")
    assert stats["state"] == "completed", stats
    shown = b.call("vm.show", name="mover")
    assert shown["state"] == "running" and shown["guest"]["verification_errors"] == 0, shown
    b.call("migrate", name="mover", to=a.address, downtime_limit_ms=10000)  # and out again, through B's own fds
    assert wait_migration(b, "mover")["state"] == "completed"
    # One warning per episode, not one per retry: every episode ended with one recovery line.
    warnings, recoveries = b.events("accept_out_of_resources"), b.events("accept_recovered")
    assert 1 <= len(warnings) <= len(recoveries) + 2, (warnings, recoveries)
    assert sum(r["failed_attempts"] for r in recoveries) >= len(recoveries)
    assert b.alive()
