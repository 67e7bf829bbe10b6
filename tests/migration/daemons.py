"""Real daemon processes for tests: each with its own control socket, port and state dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import wait_for as wait_for

from migrated.control import RequestError, request

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DaemonProcess:
    name: str
    workdir: Path
    key_file: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    netns: str | None = None
    extra_args: tuple[str, ...] = ()
    faults: str = ""  # MIGRATED_TEST_FAULTS for this daemon (migrated/faults.py)
    wrapper: tuple[str, ...] = ()  # runs the daemon under e.g. setpriv or prlimit
    environ: dict[str, str] = field(default_factory=dict)  # added to the daemon's environment
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / f"{self.name}.sock"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        command = [
            sys.executable,
            "-m",
            "migrated",
            "--control-socket",
            str(self.socket),
            "--listen",
            self.address,
            "--state-dir",
            str(self.workdir / f"{self.name}-state"),
            "--peer-key-file",
            str(self.key_file),
            *self.extra_args,
        ]
        command = [*self.wrapper, *command]
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        env = dict(os.environ, PYTHONPATH=str(REPO), MIGRATED_TEST_FAULTS=self.faults, **self.environ)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("daemon.status")
                return self
            except (RequestError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon {self.name} did not start:\n{self.log()}") from None
                time.sleep(0.05)

    def call(self, cmd: str, **args: Any) -> Any:
        return request(self.socket, cmd, args, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_digest(self, last: int = 25, limit: int = 60) -> str:
        """Its warning and error events (up to `limit`, the last ones), then its `last` events of
        any level: enough to read a failure from CI's output, short enough to print."""
        lines = self.log().splitlines()
        loud = [line for line in lines if '"level": "warning"' in line or '"level": "error"' in line]
        return "\n".join([*loud[-limit:], "...", *lines[-last:]])

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every structured event called `name` in this daemon's log, oldest first."""
        found = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None and self.alive():
            self.process.kill()
            self.process.wait()

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_migration(
    daemon: DaemonProcess,
    name: str,
    timeout: float = 120.0,
    until: tuple[str, ...] = ("completed", "failed", "aborted", "cancelled", "in-doubt"),
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = daemon.call("migration.status", name=name)
        if stats["state"] in until:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"migration of {name} still {stats['state']} after {timeout} s: {stats}")
        time.sleep(0.05)


def heartbeat(daemon: DaemonProcess, name: str) -> int:
    """The workload guest's heartbeat generation on `daemon` (rises while the guest runs)."""
    return int(daemon.call("vm.show", name=name)["guest"]["heartbeat_generation"])


def write_config(path: Path, **migration: object) -> Path:
    """A daemon config: short peer timeouts (tests cut links) and the given [migration] keys.

    The downtime guard is set wide unless a test sets it: it is tested on its own (test_downtime_guard),
    and elsewhere a loaded test host must not turn a slow cutover into a guard abort."""
    migration.setdefault("downtime_guard_ms", 60_000)
    lines = ["[peer]", "connect_timeout_s = 3", "[migration]"]
    lines += [
        f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}".replace("'", '"')
        for key, value in migration.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


MakeDaemon = Callable[..., DaemonProcess]
"""The `make_daemon` fixture (conftest.py): make_daemon(name, key=..., faults=..., **migration)."""


def guest_ram_fds(daemon: DaemonProcess) -> int:
    """The daemon's fds on guest RAM memfds: its VMs' and its RAM reserve's (a daemon with a
    reserve names every one migrated-ram, kvm/ramreserve.py)."""
    assert daemon.process is not None
    fd_dir = f"/proc/{daemon.process.pid}/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            count += os.readlink(f"{fd_dir}/{fd}").startswith("/memfd:migrated-ram")
        except FileNotFoundError:
            pass  # closed while we looked
    return count


def ram_given_back(daemon: DaemonProcess) -> int:
    """RAM files the daemon's VMs gave up so far (kept by its RAM reserve, or freed), once none
    is still being zeroed."""
    wait_for(lambda: daemon.call("daemon.status")["ram_reserve"]["zeroing"] == 0, what="the reserve to be idle")
    reserve = daemon.call("daemon.status")["ram_reserve"]
    return int(reserve["kept"]) + sum(reserve["released"].values())
