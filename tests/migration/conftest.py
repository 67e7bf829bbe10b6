"""Pairs of real daemon processes for migration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import DaemonProcess, MakeDaemon, write_config
from helpers import CALL_FAILED, write_key
from vethlink import Link, veth_link


@pytest.fixture
def link() -> Iterator[Link]:
    """Two network namespaces joined by a veth pair, removed afterwards (vethlink.py)."""
    with veth_link() as made:
        yield made


@pytest.fixture
def make_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakeDaemon]:
    """make_daemon(name, key=..., config={...}, faults=..., netns=..., host=...) -> started daemon."""
    started: list[DaemonProcess] = []
    shared_key = write_key(tmp_path / "peer.key")

    def make(
        name: str,
        *,
        key: Path | None = None,
        faults: str = "",
        netns: str | None = None,
        host: str = "127.0.0.1",
        metrics: str | None = None,
        **migration: object,
    ) -> DaemonProcess:
        config = write_config(tmp_path / f"{name}.toml", **migration)
        daemon = DaemonProcess(
            name,
            tmp_path,
            key or shared_key,
            host=host,
            netns=netns,
            extra_args=("--config", str(config), *(("--metrics-listen", metrics) if metrics else ())),
            faults=faults,
        )
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.stop()
    if request.node.stash.get(CALL_FAILED, False):
        # CI keeps only pytest's output: the daemons' own account of a failure goes into it.
        for daemon in started:
            print(f"--- daemon {daemon.name}: its warnings and errors, then its last events ---")
            print(daemon.log_digest())
