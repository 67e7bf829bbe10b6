"""Run a plan of faults against one cluster and total the outcomes (the JSON of `make faults`)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from migrated.control import RequestError

from .cluster import BANDWIDTH_MIB_S, DOWNTIME_GUARD_MS, DOWNTIME_LIMIT_MS, IO_TIMEOUT_S, MAX_ROUNDS, Cluster
from .inject import observe, reach, strike
from .outcome import DEFECTS, classify, clean_up
from .plan import Fault, make_plan

# A small workload guest that dirties memory all along, so every round has pages to send.
VM = {"memory_mib": 64, "vcpus": 2, "dirty_rate_mib_s": 24, "working_set_mib": 24}


def heal(cluster: Cluster) -> list[str]:
    """Whatever a fault left behind that is not the VM's business: a dead daemon (not killed by
    us: a crash, reported), the link, the qdisc, the filled state dir."""
    crashed = []
    for node in (cluster.a, cluster.b):
        if not node.daemon.alive():
            crashed.append(node.name)
            node.daemon.start(timeout=60)
        node.free_state_dir()
    cluster.link.up()
    cluster.link.unslow()
    return crashed


# The bulk copy sends only what the guest ever wrote: a guest just started has written ~1 MiB,
# gone in a few milliseconds, too short a window for a fault "in the bulk copy" to be seen.
# With this much written it lasts about half a second at the cluster's bandwidth cap.
BULK_DATA_BYTES = 16 << 20


def wait_for_data(cluster: Cluster, vm: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while cluster.a.daemon.call("vm.show", name=vm)["memory_allocated_bytes"] < BULK_DATA_BYTES:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{vm} did not write {BULK_DATA_BYTES >> 20} MiB within {timeout_s} s")
        time.sleep(0.05)


def run_one(cluster: Cluster, fault: Fault) -> dict[str, Any]:
    vm = f"f{fault.index:03d}"
    cluster.a.daemon.call("vm.create", name=vm, **VM)
    wait_for_data(cluster, vm)
    for node in (cluster.a, cluster.b):
        node.tail.mark()
    started = time.monotonic()
    cluster.a.daemon.call("migrate", name=vm, to=cluster.b.daemon.address)
    reached = reach(cluster, fault, vm)
    record: dict[str, Any] = {**fault.as_dict(), "vm": vm, "reached": reached}
    if reached:
        time.sleep(fault.delay_s)  # the random point inside the phase's window
        record["observed"] = observe(cluster, vm)
        record["died"] = died = strike(cluster, fault)
    else:
        # Why not: the migration's own outcome, e.g. a guard that fired on a loaded host.
        record["observed"] = observe(cluster, vm)
        stats = cluster.a.daemon.call("migration.status", name=vm)
        record["unreached_because"] = {"state": stats["state"], "error": stats.get("error")}
        died = []
    try:
        record.update(classify(cluster, vm, died))
    except (RequestError, OSError) as err:
        # A daemon that stopped answering (crashed): the outcome cannot be read, that is the defect.
        record.update({"class": "daemon-crash", "error": str(err)})
    record["crashed"] = heal(cluster)
    record["seconds"] = round(time.monotonic() - started, 2)
    clean_up(cluster, vm)
    return record


def totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    injected = [r for r in records if r["reached"]]
    by_class = Counter(r["class"] for r in records)
    return {
        "faults": len(injected),
        "planned": len(records),
        "phase_not_reached": len(records) - len(injected),
        "faults_by_phase": dict(sorted(Counter(r["phase"] for r in injected).items())),
        "faults_by_kind": dict(sorted(Counter(r["kind"] for r in injected).items())),
        "outcomes_by_class": dict(sorted(by_class.items())),
        "split_brains": by_class["split-brain"],
        "unreported_losses": by_class["lost-unreported"],
        "guest_check_failures": by_class["guest-check-failed"],
        "unsettled": by_class["unsettled"],
        "daemon_crash_outcomes": by_class["daemon-crash"],
        "daemon_crashes": sum(len(r["crashed"]) for r in records),
        "defects": [
            {k: r.get(k) for k in ("index", "phase", "kind", "class", "where", "guest_problem", "crashed")}
            for r in records
            if r["class"] in DEFECTS or r["crashed"]
        ],
    }


def run_matrix(work: Path, seed: int, count: int, progress: Any = None) -> dict[str, Any]:
    plan = make_plan(seed, count)
    cluster = Cluster(work)
    records = []
    started = time.monotonic()
    try:
        for fault in plan:
            record = run_one(cluster, fault)
            records.append(record)
            if progress is not None:
                progress(record)
    finally:
        cluster.close()
    return {
        "seed": seed,
        "config": {
            "io_timeout_s": IO_TIMEOUT_S,
            "downtime_limit_ms": DOWNTIME_LIMIT_MS,
            "downtime_guard_ms": DOWNTIME_GUARD_MS,
            "max_rounds": MAX_ROUNDS,
            "max_bandwidth_mib_s": BANDWIDTH_MIB_S,
            "vm": VM,
        },
        "seconds": round(time.monotonic() - started, 1),
        "totals": totals(records),
        "faults": records,
    }
