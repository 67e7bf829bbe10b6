"""After the dust settles: where does the VM run, is its guest sound, and is every loss reported?

Classes:
- running-one-side: runs on exactly one daemon, heartbeat rising, no verification error.
- in-doubt-resolved: the same, after the source held it in doubt (COMMIT out, RUNNING lost) and
  asked the target again.
- lost-reported: runs nowhere, and a daemon whose process died reports it (vm_lost_at_restart,
  `vm list --lost`) after its restart.
- Defects: split-brain (running on both), lost-unreported, guest-check-failed, unsettled (still
  migrating or in doubt after the settle deadline), daemon-crash (a daemon we did not kill died).
"""

from __future__ import annotations

import time
from typing import Any

from .cluster import Cluster, Node

SETTLE_TIMEOUT_S = 60.0
HEARTBEAT_STEPS = 3
HEARTBEAT_TIMEOUT_S = 30.0
TERMINAL = ("completed", "failed", "aborted", "cancelled", "completed-by-operator")
DEFECTS = ("split-brain", "lost-unreported", "guest-check-failed", "unsettled", "daemon-crash")


def _vm_states(node: Node, vm: str) -> str | None:
    for entry in node.daemon.call("vm.list"):
        if entry["name"] == vm:
            return str(entry["state"])
    return None


def _source_state(node: Node, vm: str) -> str | None:
    try:
        stats = node.daemon.call("migration.status", name=vm)
    except Exception:  # noqa: BLE001 - a restarted daemon knows no migration of it
        return None
    return None if stats is None else str(stats["state"])


def settle(cluster: Cluster, vm: str) -> dict[str, Any]:
    """Wait until the source's migration ended (in doubt resolved) and no side is mid-migration."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        source = _source_state(cluster.a, vm)
        where = {node.name: _vm_states(node, vm) for node in (cluster.a, cluster.b)}
        settled = (source is None or source in TERMINAL) and where["a"] not in ("migrating", "in-doubt")
        # A loaded copy on the target waits (paused) for a query that a source which aborted
        # before COMMIT never sends; it never runs without COMMIT, so it does not hold us up.
        if settled or time.monotonic() > deadline:
            return {"settled": settled, "source_migration": source, "where": where}
        time.sleep(0.05)


def guest_check(node: Node, vm: str) -> str | None:
    """None if the guest's heartbeat rises and it found no verification error; else the problem."""
    first = node.daemon.call("vm.show", name=vm)
    start = int(first["guest"]["heartbeat_generation"])
    deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S
    while True:
        shown = node.daemon.call("vm.show", name=vm)
        if shown["state"] != "running":
            return f"state {shown['state']}: {shown.get('error')}"
        if int(shown["guest"]["heartbeat_generation"]) >= start + HEARTBEAT_STEPS:
            break
        if time.monotonic() > deadline:
            return f"heartbeat stuck at {shown['guest']['heartbeat_generation']}"
        time.sleep(0.05)
    if shown["guest"]["verification_errors"]:
        return f"{shown['guest']['verification_errors']} verification errors"
    if shown["error"] is not None:
        return f"error {shown['error']}"
    return None


def _lost_reported(node: Node, vm: str) -> bool:
    listed = any(v["name"] == vm for v in node.daemon.call("vm.list", lost=True))
    logged = any(e.get("event") == "vm_lost_at_restart" and e.get("vm") == vm for e in node.tail.since_mark())
    return listed and logged


def _was_in_doubt(node: Node, vm: str) -> bool:
    return any(e.get("event") == "migration_in_doubt" and e.get("vm") == vm for e in node.tail.since_mark())


def classify(cluster: Cluster, vm: str, died: list[str]) -> dict[str, Any]:
    result = settle(cluster, vm)
    where = result["where"]
    running = [name for name, state in where.items() if state == "running"]
    nodes = {"a": cluster.a, "b": cluster.b}
    result["running_on"] = running
    if not result["settled"]:
        result["class"] = "unsettled"
    elif len(running) == 2:
        result["class"] = "split-brain"
    elif len(running) == 1:
        problem = guest_check(nodes[running[0]], vm)
        result["guest_problem"] = problem
        if problem is not None:
            result["class"] = "guest-check-failed"
        else:
            result["class"] = "in-doubt-resolved" if _was_in_doubt(cluster.a, vm) else "running-one-side"
    else:
        reported_by = [name for name in died if _lost_reported(nodes[name], vm)]
        result["reported_by"] = reported_by
        result["class"] = "lost-reported" if reported_by else "lost-unreported"
    return result


def clean_up(cluster: Cluster, vm: str) -> None:
    """Stop the VM wherever it runs and forget reported losses: the next fault starts clean."""
    for node in (cluster.a, cluster.b):
        state = _vm_states(node, vm)
        if state in ("running", "paused", "failed"):
            node.daemon.call("vm.stop", name=vm)
        if any(v["name"] == vm for v in node.daemon.call("vm.list", lost=True)):
            node.daemon.call("vm.forget", name=vm)
