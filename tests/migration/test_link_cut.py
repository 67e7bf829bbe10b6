"""A real link that can be cut: two network namespaces joined by a veth pair.

`ip link set ... down` in the middle of the dirty rounds: no RST, no FIN, the bytes just stop,
as with a pulled cable. Both daemons must notice by themselves (the peer I/O progress timeout),
the source must keep the VM running and the target must discard its partial copy.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from daemons import MakeDaemon
from daemons import wait_for, wait_migration
from test_migration import assert_runs_here, create

pytestmark = pytest.mark.kvm


@dataclass(frozen=True)
class Link:
    ns_a: str
    ns_b: str
    addr_a: str
    addr_b: str
    dev_a: str

    def cut(self) -> None:
        subprocess.run(["ip", "-n", self.ns_a, "link", "set", self.dev_a, "down"], check=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def link() -> Iterator[Link]:
    tag = os.urandom(3).hex()
    ns_a, ns_b, dev_a, dev_b = f"mga-{tag}", f"mgb-{tag}", f"va{tag}", f"vb{tag}"
    addr_a, addr_b = "10.213.0.1", "10.213.0.2"
    _ip("netns", "add", ns_a)
    _ip("netns", "add", ns_b)
    try:
        _ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        _ip("link", "set", dev_a, "netns", ns_a)
        _ip("link", "set", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield Link(ns_a, ns_b, addr_a, addr_b, dev_a)
    finally:
        subprocess.run(["ip", "netns", "del", ns_a], check=False)
        subprocess.run(["ip", "netns", "del", ns_b], check=False)


def test_link_cut_during_dirty_rounds(make_daemon: MakeDaemon, link: Link) -> None:
    a = make_daemon(
        "a", netns=link.ns_a, host=link.addr_a, downtime_limit_ms=1, max_rounds=10000, faults="source-stall-rounds"
    )
    b = make_daemon("b", netns=link.ns_b, host=link.addr_b)
    create(a, rate="max", working_set_mib=64)
    a.call("migrate", name="vm1", to=b.address)
    wait_for(lambda: a.call("migration.status", name="vm1")["round"] >= 2, timeout=30, what="two dirty rounds")
    assert "vm1" in [vm["name"] for vm in b.call("vm.list")]
    link.cut()
    stats = wait_migration(a, "vm1", timeout=60)
    assert stats["state"] == "failed", stats
    assert "no progress" in stats["error"] or "nothing received" in stats["error"], stats
    assert_runs_here(a, "vm1")
    wait_for(
        lambda: "vm1" not in [vm["name"] for vm in b.call("vm.list")], timeout=30, what="the target to discard its copy"
    )
    assert '"event": "incoming_vm_discarded"' in b.log()
