"""A real link that can be cut: two network namespaces joined by a veth pair (vethlink.py).

`ip link set ... down` in the middle of the dirty rounds: no RST, no FIN, the bytes just stop,
as with a pulled cable. Both daemons must notice by themselves (the peer I/O progress timeout),
the source must keep the VM running and the target must discard its partial copy.
"""

from __future__ import annotations

import pytest

from daemons import MakeDaemon
from daemons import wait_for, wait_migration
from test_migration import assert_runs_here, create
from vethlink import Link

pytestmark = pytest.mark.kvm


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
