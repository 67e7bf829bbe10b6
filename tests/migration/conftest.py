"""Pairs of real daemon processes for migration tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemons import DaemonProcess


def write_key(path: Path, key: bytes | None = None) -> Path:
    path.write_bytes(key if key is not None else os.urandom(32))
    path.chmod(0o600)
    return path


def write_config(path: Path, **migration: object) -> Path:
    """A daemon config: short peer timeouts (tests cut links) and the given [migration] keys."""
    lines = ["[peer]", "connect_timeout_s = 3", "[migration]"]
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in migration.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


MakeDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[MakeDaemon]:
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
