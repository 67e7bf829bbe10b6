"""The two daemons of the matrix, each in its network namespace with a small tmpfs as its state
dir (so that "state dir full" is a real ENOSPC), started, restarted and read through their logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "migration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # helpers.py

from daemons import DaemonProcess, free_port  # noqa: E402

from .netlink import Link  # noqa: E402

STATE_DIR_BYTES = 4 << 20

# The timeouts the faults are measured against (a stop is shorter or longer than each).
IO_TIMEOUT_S = 2.0  # [peer] connect_timeout_s: also the peer I/O progress timeout
DOWNTIME_LIMIT_MS = 10  # never met: max_rounds then force the downtime, so every phase comes
DOWNTIME_GUARD_MS = 2500  # must cover the holds of the downtime (3 x faults.HOLD_S) and the work
GUARD_S = (DOWNTIME_LIMIT_MS + DOWNTIME_GUARD_MS) / 1e3
MAX_ROUNDS = 3
BANDWIDTH_MIB_S = 32  # so that the bulk copy and each round last long enough to be hit

CONFIG = f"""[peer]
connect_timeout_s = {IO_TIMEOUT_S}
[migration]
downtime_limit_ms = {DOWNTIME_LIMIT_MS}
downtime_guard_ms = {DOWNTIME_GUARD_MS}
max_rounds = {MAX_ROUNDS}
on_no_convergence = "force-downtime"
max_bandwidth_mib_s = {BANDWIDTH_MIB_S}
timeout_s = 60
"""


class LogTail:
    """New JSON events of a daemon's log since the last mark (the log is appended across restarts)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def since_mark(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            for line in file.read().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a traceback or other non-event output
                if isinstance(event, dict):
                    yield event

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.since_mark():
                if predicate(event):
                    return event
            time.sleep(0.01)
        return None


@dataclass
class Node:
    daemon: DaemonProcess
    tail: LogTail
    state_dir: Path
    fill: Path = field(init=False)

    def __post_init__(self) -> None:
        self.fill = self.state_dir / "fill.bin"

    @property
    def name(self) -> str:
        return self.daemon.name

    @property
    def pid(self) -> int:
        assert self.daemon.process is not None
        return self.daemon.process.pid

    def fill_state_dir(self) -> None:
        """Take every free byte of the state dir's tmpfs: the next record write gets ENOSPC."""
        free = os.statvfs(self.state_dir)
        fd = os.open(self.fill, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            chunk = b"\xff" * (1 << 16)
            left = free.f_bavail * free.f_frsize
            while True:  # until ENOSPC, past what statvfs said: metadata takes its share too
                os.write(fd, chunk if left > len(chunk) else chunk[:4096])
                left -= len(chunk)
        except OSError:
            pass
        finally:
            os.close(fd)

    def free_state_dir(self) -> None:
        self.fill.unlink(missing_ok=True)

    def restart(self) -> None:
        self.daemon.kill()
        self.daemon.start(timeout=60)


class Cluster:
    """Daemon a (10.213.7.1, the source of every migration) and b (10.213.7.2)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.link = Link.create()
        self.mounts: list[Path] = []
        key = work / "peer.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        config = work / "faults.toml"
        config.write_text(CONFIG)
        self.a = self._node("a", key, config, self.link.ns_a, self.link.addr_a)
        self.b = self._node("b", key, config, self.link.ns_b, self.link.addr_b)

    def _node(self, name: str, key: Path, config: Path, netns: str, host: str) -> Node:
        state_dir = self.work / f"{name}-state"
        state_dir.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STATE_DIR_BYTES}", "tmpfs", str(state_dir)], check=True)
        self.mounts.append(state_dir)
        daemon = DaemonProcess(
            name,
            self.work,
            key,
            host=host,
            port=free_port(),
            netns=netns,
            extra_args=("--config", str(config)),
            faults="cutover-holds,source-stall-rounds",
        )
        node = Node(daemon, LogTail(daemon.log_path), state_dir)
        daemon.start(timeout=60)
        return node

    def close(self) -> None:
        for node in (self.a, self.b):
            try:
                os.kill(node.pid, 18)  # SIGCONT: a stopped daemon cannot stop
            except (OSError, AssertionError):
                pass
            node.daemon.stop()
        for path in self.mounts:
            subprocess.run(["umount", "-l", str(path)], check=False)
        self.link.destroy()
