"""Reach a fault's point in the migration by watching the daemons, strike, and heal.

Points are seen, not guessed: the source's status (bulk, round N) or a `test_fault_hold` event
in a daemon's log (setup, downtime, done, commit on the source; loaded, running on the target).
Only the fault's own length is slept: that is the fault (a link down for 3 s), not a hope.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from .cluster import Cluster, Node
from .plan import Fault

TARGET_POINTS = ("loaded", "running")
REACH_TIMEOUT_S = 60.0


def reach(cluster: Cluster, fault: Fault, vm: str) -> bool:
    """Wait until the migration of `vm` is at the fault's phase; False if it never got there."""
    phase = fault.phase
    if phase in ("bulk",) or phase.startswith("round-"):
        wanted_round = int(phase.split("-")[1]) if phase.startswith("round-") else 0
        deadline = time.monotonic() + REACH_TIMEOUT_S
        while time.monotonic() < deadline:
            stats = cluster.a.daemon.call("migration.status", name=vm)
            if phase == "bulk" and stats["phase"] == "bulk":
                return True
            if wanted_round and stats["phase"] == "rounds" and stats["round"] >= wanted_round:
                return stats["round"] == wanted_round
            if stats["state"] in ("completed", "failed", "aborted", "cancelled", "in-doubt"):
                return False
            time.sleep(0.01)
        return False
    node = cluster.b if phase in TARGET_POINTS else cluster.a
    deadline = time.monotonic() + REACH_TIMEOUT_S
    while time.monotonic() < deadline:
        seen = node.tail.wait(
            lambda e: e.get("event") == "test_fault_hold" and e.get("point") == phase and e.get("vm") == vm, 0.2
        )
        if seen is not None:
            return True
        # A migration that ended before the point (it failed on its own) never reaches it.
        if cluster.a.daemon.call("migration.status", name=vm)["state"] in ("completed", "failed", "aborted"):
            return False
    return False


def observe(cluster: Cluster, vm: str) -> dict[str, Any]:
    """Where the migration is at the moment of the strike, as both sides tell it."""
    seen: dict[str, Any] = {}
    for node in (cluster.a, cluster.b):
        try:
            stats = node.daemon.call("migration.status", name=vm)
            seen[node.name] = stats["phase"] if stats else None
        except Exception as err:  # noqa: BLE001 - what it says is the observation
            seen[node.name] = f"unknown: {err}"
    return seen


def strike(cluster: Cluster, fault: Fault) -> list[str]:
    """Inject the fault and heal it; returns the daemons whose process died (and was restarted)."""
    kind = fault.kind
    link = cluster.link
    if kind.startswith("link-down"):
        link.down()
        time.sleep(fault.duration_s)
        link.up()
        return []
    if kind == "link-slow":
        link.slow()
        time.sleep(fault.duration_s)
        link.unslow()
        return []
    if kind.startswith("kill-"):
        node = cluster.b if kind == "kill-target" else cluster.a
        node.restart()
        return [node.name]
    if kind == "term-source":
        cluster.a.daemon.stop()
        cluster.a.daemon.start(timeout=60)
        return [cluster.a.name]
    if kind.startswith("stop-"):
        node = cluster.b if kind.startswith("stop-target") else cluster.a
        _stop_for(node, fault.duration_s)
        return []
    if kind.startswith("full-"):
        node = cluster.a if kind == "full-source-state-dir" else cluster.b
        node.fill_state_dir()
        time.sleep(fault.duration_s)
        node.free_state_dir()
        return []
    raise ValueError(f"unknown fault kind {kind!r}")


def _stop_for(node: Node, seconds: float) -> None:
    os.kill(node.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(node.pid, signal.SIGCONT)
