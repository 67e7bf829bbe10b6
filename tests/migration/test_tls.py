"""Mutual TLS between peers (peer.auth = "tls"): a CA, two peer certificates, one stranger."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from daemons import DaemonProcess, wait_migration
from helpers import write_key
from test_migration import assert_absent, assert_runs_here, create

pytestmark = pytest.mark.kvm


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN={name} CA",
    )
    return key, cert


def make_cert(directory: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={name}",
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[1]),
        "-CAkey",
        str(ca[0]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
    )
    key.chmod(0o600)
    return key, cert


def tls_daemon(tmp_path: Path, name: str, cert: tuple[Path, Path], ca_cert: Path) -> DaemonProcess:
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[peer]\nauth = "tls"\ntls_key = "{cert[0]}"\ntls_cert = "{cert[1]}"\n'
        f'tls_ca = "{ca_cert}"\nconnect_timeout_s = 3\n'
    )
    # The pre-shared key is not used with TLS; the harness passes one anyway.
    return DaemonProcess(
        name, tmp_path, write_key(tmp_path / f"{name}.unused-key"), extra_args=("--config", str(config))
    )


def test_mutual_tls_migration_and_a_stranger_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "migration")
    other_ca = make_ca(tmp_path, "stranger")
    a = tls_daemon(tmp_path, "a", make_cert(tmp_path, "a", ca), ca[1])
    b = tls_daemon(tmp_path, "b", make_cert(tmp_path, "b", ca), ca[1])
    c = tls_daemon(tmp_path, "c", make_cert(tmp_path, "c", other_ca), other_ca[1])
    try:
        for daemon in (a, b, c):
            daemon.start()
        create(a, memory_mib=128, rate=16, working_set_mib=32)
        a.call("migrate", name="vm1", to=b.address)
        stats = wait_migration(a, "vm1")
        assert stats["state"] == "completed", stats
        assert_absent(a, "vm1")
        assert_runs_here(b, "vm1")
        # A peer whose certificate another CA signed gets no VM data.
        b.call("migrate", name="vm1", to=c.address)
        stats = wait_migration(b, "vm1")
        assert stats["state"] == "failed" and "TLS" in stats["error"], stats
        assert_runs_here(b, "vm1")
        assert c.call("vm.list") == []
    finally:
        for daemon in (a, b, c):
            daemon.stop()
