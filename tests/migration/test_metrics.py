"""The Prometheus endpoint (`--metrics-listen`): scraped from a real daemon during and after real
migrations; the text is parsed by prometheus-client's own parser, not matched by eye."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MakeDaemon
from daemons import DaemonProcess, free_port, wait_for, wait_migration
from test_migration import create

pytestmark = pytest.mark.kvm


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_migrations_and_show_the_vms(make_daemon: MakeDaemon) -> None:
    port_a, port_b = free_port(), free_port()
    a = make_daemon("a", metrics=f"127.0.0.1:{port_a}")
    b = make_daemon("b", metrics=f"127.0.0.1:{port_b}")
    create(a, memory_mib=64, working_set_mib=16, rate=16)
    before = scrape(port_a)
    assert value(before, "migrated_vms", state="running") == 1
    assert ("migrated_vm_ring_full_exits_total", (("vm", "vm1"),)) in before
    for source, target in ((a, b), (b, a)):
        source.call("migrate", name="vm1", to=target.address)
        assert wait_migration(source, "vm1")["state"] == "completed"
        # The target counts its side once its own part (record, streams, the source's timing) is done.
        assert wait_migration(target, "vm1")["state"] == "completed"
        # The VM's RAM file, zeroed, is kept where it left (the RAM reserve) before it comes back.
        wait_for(lambda s=source: s.call("daemon.status")["ram_reserve"]["files"] == 1, what="the kept RAM file")
    after_a, after_b = scrape(port_a), scrape(port_b)
    assert value(after_a, "migrated_migrations_total", role="source", outcome="completed") == 1
    assert value(after_a, "migrated_migrations_total", role="target", outcome="completed") == 1
    assert value(after_b, "migrated_migrations_total", role="source", outcome="completed") == 1
    assert value(after_a, "migrated_migration_downtime_seconds_count") == 1
    assert value(after_a, "migrated_migration_duration_seconds_count") == 1
    assert value(after_a, "migrated_migration_sent_bytes_total") > 64 * 1024
    assert value(after_a, "migrated_vms", state="running") == 1
    assert value(after_b, "migrated_vms", state="running") == 0
    assert ("migrated_migration_dirty_rate_bytes_per_second", (("role", "source"), ("vm", "vm1"))) in after_b
    # The RAM reserve: a took back the file the VM left there; b keeps the one it left on b.
    assert value(after_a, "migrated_ram_reserve_taken_total") == 1
    assert value(after_a, "migrated_ram_reserve_files") == 0
    wait_for(lambda: b.call("daemon.status")["ram_reserve"]["files"] == 1, what="b to keep the VM's RAM file")
    kept = scrape(port_b)
    assert value(kept, "migrated_ram_reserve_files") == 1
    assert value(kept, "migrated_ram_reserve_bytes") > 0


def test_a_metrics_address_in_use_is_named(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        daemon = DaemonProcess("c", a.workdir, a.key_file, extra_args=("--metrics-listen", f"127.0.0.1:{port}"))
        with pytest.raises(RuntimeError, match=rf"cannot serve metrics on 127.0.0.1:{port}: Address already in use"):
            daemon.start(timeout=10)
