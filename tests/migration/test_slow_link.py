"""A slow real link: the veth pair of the `link` fixture (vethlink.py), shaped by a token bucket on the source's
side (`tc qdisc tbf`: this host has it, netem it has not).

The target's receive threads sleep until a whole record is queued (SO_RCVLOWAT set to what the
buffer in hand lacks, then a receive that does not wait: migration/blocking.py RecordReads). On
this link a record of up to `migration.max_batch_bytes` (8 MiB) takes more than a second and
arrives in hundreds of segments, and the kernel wakes the reader short of its mark whenever the
receive window fills: the migration must still complete, its memory verified in full, and the
VM must run on the target."""

from __future__ import annotations

import subprocess

import pytest

from daemons import MakeDaemon, wait_for, wait_migration
from test_migration import assert_absent, assert_runs_here, create
from vethlink import Link

pytestmark = pytest.mark.kvm

RATE_MBIT = 40  # 5 MB/s: a 16 MiB working set takes ~3 s, each 8 MiB record ~1.7 s per stream


def test_a_migration_over_a_slow_link_completes_with_records_that_take_seconds(
    make_daemon: MakeDaemon,
    link: Link,
) -> None:
    subprocess.run(
        ["tc", "-n", link.ns_a, "qdisc", "add", "dev", link.dev_a, "root", "tbf",
         "rate", f"{RATE_MBIT}mbit", "burst", "64kbit", "latency", "400ms"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    a = make_daemon("a", netns=link.ns_a, host=link.addr_a)
    b = make_daemon("b", netns=link.ns_b, host=link.addr_b)
    create(a, memory_mib=64, vcpus=1, rate="max", working_set_mib=16)
    # The working set written once over (data to carry), then a trickle the link outruns.
    wait_for(lambda: a.call("vm.show", name="vm1")["guest"]["pages_written"] > 16 * 256, timeout=60, what="data")
    a.call("vm.set", name="vm1", dirty_rate_mib_s=0.25)
    a.call("migrate", name="vm1", to=b.address, verify="full")
    stats = wait_migration(a, "vm1", timeout=180)
    assert stats["state"] == "completed", stats
    # The working set went in the bulk copy, over the shaped link: records of seconds each.
    assert stats["bulk_bytes"] > 16 << 20, stats
    assert_runs_here(b, "vm1")
    assert_absent(a, "vm1")
