"""Names are reserved atomically (DESIGN 6, issue 10): for `vm create` and for an incoming
migration, before any thread or fd of the new VM exists. The loser of a race is told that the
name is taken, and nothing of its VM remains anywhere."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from conftest import MakeDaemon
from daemons import DaemonProcess, guest_ram_fds, ram_given_back, wait_for, wait_migration
from migrated.control import RequestError

pytestmark = pytest.mark.kvm

SMALL_VM: dict[str, Any] = {"memory_mib": 64, "vcpus": 2, "working_set_mib": 8, "dirty_rate_mib_s": 8}


def threads(daemon: DaemonProcess) -> int:
    assert daemon.process is not None
    return len(os.listdir(f"/proc/{daemon.process.pid}/task"))


def at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads released together; each one's result or the exception it raised."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = calls[index]()
        except Exception as err:
            results[index] = err

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not any(worker.is_alive() for worker in workers), "a call did not return"
    return results


def heartbeat(daemon: DaemonProcess, name: str) -> int:
    return int(daemon.call("vm.show", name=name)["guest"]["heartbeat_generation"])


def assert_runs_here(daemon: DaemonProcess, name: str) -> None:
    before = daemon.call("vm.show", name=name)
    assert before["state"] == "running", before
    wait_for(
        lambda: heartbeat(daemon, name) > before["guest"]["heartbeat_generation"] + 5,
        what=f"{name}'s heartbeat to rise on {daemon.name}",
    )
    after = daemon.call("vm.show", name=name)
    assert after["guest"]["verification_errors"] == 0 and after["error"] is None, after


def test_six_concurrent_creates_of_one_name_make_one_vm(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    baseline = threads(a)
    results = at_once([lambda: a.call("vm.create", name="twin", **SMALL_VM) for _ in range(6)])
    created = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, RequestError)]
    assert len(created) == 1 and len(refused) == 5, results
    for err in refused:
        assert "a VM named 'twin' already exists" in str(err), err
    assert [vm["name"] for vm in a.call("vm.list")] == ["twin"]
    assert guest_ram_fds(a) == 1 and ram_given_back(a) == 0, "a refused create made guest RAM"
    assert_runs_here(a, "twin")
    a.call("vm.stop", name="twin")
    assert ram_given_back(a) == 1
    assert guest_ram_fds(a) == a.call("daemon.status")["ram_reserve"]["files"], "RAM neither kept nor freed"
    # trio's idle worker threads end by themselves within seconds; a VM's vCPU threads do not.
    wait_for(lambda: threads(a) <= baseline, timeout=40, what=f"threads back to {baseline} (now {threads(a)})")
    assert a.alive() and a.call("daemon.status")["vms"] == 0


def test_two_sources_migrating_one_name_to_one_target(make_daemon: MakeDaemon) -> None:
    a1, a2, b = make_daemon("a1"), make_daemon("a2"), make_daemon("b")
    for source in (a1, a2):
        source.call("vm.create", name="twin", **SMALL_VM)
        wait_for(lambda s=source: heartbeat(s, "twin") > 0, what="the first heartbeat")
    at_once([lambda s=source: s.call("migrate", name="twin", to=b.address) for source in (a1, a2)])
    outcomes = {source.name: wait_migration(source, "twin") for source in (a1, a2)}
    completed = [name for name, stats in outcomes.items() if stats["state"] == "completed"]
    assert len(completed) == 1, outcomes
    loser = a2 if completed == ["a1"] else a1
    error = outcomes[loser.name]["error"]
    assert outcomes[loser.name]["state"] == "failed", outcomes
    assert "a VM named 'twin' already exists" in error, error
    assert_runs_here(loser, "twin")  # the loser's VM never left its source
    assert [vm["name"] for vm in b.call("vm.list")] == ["twin"]
    assert_runs_here(b, "twin")
    assert guest_ram_fds(b) == 1 and ram_given_back(b) == 0, "the refused migration made guest RAM on the target"
    winner = a1 if loser is a2 else a2
    assert "twin" not in [vm["name"] for vm in winner.call("vm.list")]
