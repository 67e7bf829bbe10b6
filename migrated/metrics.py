"""Metrics in the Prometheus text format (`daemon.metrics_listen`, opt-in), by prometheus-client.

Counters and histograms are fed by the event stream (the same events the log has: a migration
that completed, failed, was discarded...), so no migration code knows about metrics; gauges are
read from the daemon's state when Prometheus scrapes. The HTTP server is prometheus-client's own,
on a thread of its own; a scrape only reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import HostPort
from .events import BUS, Event

DOWNTIME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
TOTAL_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Event name -> (role, outcome) of migrated_migrations_total.
OUTCOMES = {
    "migration_completed": ("source", "completed"),
    "migration_failed": ("source", "failed"),
    "migration_in_doubt": ("source", "in-doubt"),
    "incoming_vm_running": ("target", "completed"),
    "incoming_vm_discarded": ("target", "discarded"),
}


class Observed(Protocol):
    """What a scrape reads from the daemon (the Daemon has it)."""

    vms: dict[str, Any]
    migrations: dict[str, Any]
    ram_reserve: Any  # kvm/ramreserve.py RamReserve: its status()


class MetricsError(Exception):
    pass


class DaemonMetrics:
    def __init__(self, daemon: Observed) -> None:
        self.registry = CollectorRegistry()
        self.migrations = Counter(
            "migrated_migrations",
            "Migrations ended, by role and outcome",
            ["role", "outcome"],
            registry=self.registry,
        )
        self.downtime = Histogram(
            "migrated_migration_downtime_seconds",
            "Measured downtime of completed migrations (source side)",
            buckets=DOWNTIME_BUCKETS_S,
            registry=self.registry,
        )
        self.total = Histogram(
            "migrated_migration_duration_seconds",
            "Total time of completed migrations, setup to release (source side)",
            buckets=TOTAL_BUCKETS_S,
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "migrated_migration_sent_bytes", "Bytes sent by completed migrations", registry=self.registry
        )
        self.over_limit = Counter(
            "migrated_migration_downtime_limit_exceeded",
            "Completed migrations whose downtime exceeded their limit",
            registry=self.registry,
        )
        self.warnings = Counter("migrated_events", "Events logged, by level", ["level"], registry=self.registry)
        self.registry.register(_Live(daemon))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe(self, event: Event) -> None:
        """Any thread: count what `event` says (called by the event bus for every event)."""
        name = event.get("event")
        self.warnings.labels(str(event.get("level", "info"))).inc()
        outcome = OUTCOMES.get(str(name))
        if outcome is not None:
            self.migrations.labels(*outcome).inc()
        if name == "migration_completed":
            if isinstance(event.get("downtime_ms"), (int, float)):
                self.downtime.observe(event["downtime_ms"] / 1e3)
            if isinstance(event.get("total_ms"), (int, float)):
                self.total.observe(event["total_ms"] / 1e3)
            if isinstance(event.get("bytes_sent"), int):
                self.bytes_sent.inc(event["bytes_sent"])
        elif name == "downtime_limit_exceeded":
            self.over_limit.inc()

    def serve(self, listen: HostPort) -> None:
        try:
            self._server, self._thread = start_http_server(listen.port, listen.host, registry=self.registry)
        except OSError as err:
            raise MetricsError(f"cannot serve metrics on {listen}: {err.strerror or err}") from None
        BUS.add_listener(self.observe)

    def close(self) -> None:
        BUS.remove_listener(self.observe)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Live(Collector):
    """Gauges read at scrape time: VMs by state, and per VM its tracker and migration."""

    def __init__(self, daemon: Observed) -> None:
        self._daemon = daemon

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics())

    def _metrics(self) -> Iterator[Metric]:
        hosted = list(self._daemon.vms.values())
        by_state = GaugeMetricFamily("migrated_vms", "VMs hosted here, by state", labels=["state"])
        counts: dict[str, int] = {}
        for vm in hosted:
            counts[vm.state.value] = counts.get(vm.state.value, 0) + 1
        for state, count in sorted(counts.items()):
            by_state.add_metric([state], count)
        yield by_state
        ring_full = CounterMetricFamily(
            "migrated_vm_ring_full_exits", "KVM_EXIT_DIRTY_RING_FULL exits of a VM's vCPUs", labels=["vm"]
        )
        harvest = GaugeMetricFamily(
            "migrated_vm_last_harvest_seconds", "Duration of a VM's last dirty-page collection", labels=["vm"]
        )
        for vm in hosted:
            tracker = vm.vm.tracker if vm.vm is not None else None
            if tracker is not None:
                ring_full.add_metric([vm.name], tracker.stats.ring_full_exits)
                harvest.add_metric([vm.name], tracker.stats.last_collect_ms / 1e3)
        yield ring_full
        yield harvest
        dirty = GaugeMetricFamily(
            "migrated_migration_dirty_rate_bytes_per_second",
            "Dirty rate measured by a migration in progress or last run",
            labels=["vm", "role"],
        )
        sent = GaugeMetricFamily(
            "migrated_migration_bytes_sent", "Bytes sent so far by a VM's latest migration", labels=["vm", "role"]
        )
        for name, migration in list(self._daemon.migrations.items()):
            stats = getattr(migration, "stats", None)
            if stats is None:
                continue
            dirty.add_metric([name, stats.role], stats.dirty_rate_mib_s * (1 << 20))
            sent.add_metric([name, stats.role], stats.bytes_sent)
        yield dirty
        yield sent
        reserve = self._daemon.ram_reserve.status()
        yield GaugeMetricFamily(
            "migrated_ram_reserve_files", "Zeroed RAM files kept for the next VM (RAM reserve)", value=reserve["files"]
        )
        yield GaugeMetricFamily(
            "migrated_ram_reserve_bytes", "RAM held by the RAM reserve's files", value=reserve["kept_mib"] * (1 << 20)
        )
        yield CounterMetricFamily(
            "migrated_ram_reserve_taken", "VMs whose RAM file came from the RAM reserve", value=reserve["taken"]
        )
