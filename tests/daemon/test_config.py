"""migrated.config: defaults, the annotated file, every validation error, overrides, reload diff."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import write_key

from migrated.config import (
    Config,
    ConfigError,
    HostPort,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
ANNOTATED = REPO / "config" / "migrated.toml"

# A throwaway self-signed P-256 certificate with its key, and an unrelated key: test data only.
TLS_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBhzCCAS2gAwIBAgIUIxwNqEicjUCDn5eGZL+ImgNroYIwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNbWlncmF0ZWQtdGVzdDAgFw0yNjExMjUxNDQ4NDdaGA8yMTI2
MTEwMTE0NDg0N1owGDEWMBQGA1UEAwwNbWlncmF0ZWQtdGVzdDBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABEZ0AYe8QnHmavWny8O+zzXo42WdFclw6f5SbspcVBmJ
0s1XNWLBCaQkCtb6sSKA52mq7ZLfG6u4TqJ4hz/r/q+jUzBRMB0GA1UdDgQWBBQN
vG4rIt2sRDrkOUkhQMVSJXARWzAfBgNVHSMEGDAWgBQNvG4rIt2sRDrkOUkhQMVS
JXARWzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQCW4L4FYMeD
4GR2ZtkHk+2Y3vqp+xld+Yo+h7s17EN55QIgUNBLiZuQmtce63rpT98KPNlicM7S
JBb8Vx8wlw5GsT8=
-----END CERTIFICATE-----
"""
TLS_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgfFoF7yVKfJ55tC3P
EckLXXFV/t6iS//epklAkgVEldKhRANCAARGdAGHvEJx5mr1p8vDvs816ONlnRXJ
cOn+Um7KXFQZidLNVzViwQmkJArW+rEigOdpqu2S3xuruE6ieIc/6/6v
-----END PRIVATE KEY-----
"""
OTHER_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgUUNkNRzb0yHpia5a
9SKwacUM4l5SR7Xb0KZ1BsR3C+OhRANCAASEZOOgwAW1m+upfZWl3nBudjt1SGL3
XJXXt1oND85jzQe/14O1Mf0GKOqFsYxs7+g2RK5OZ5HbSd5UBElieFaB
-----END PRIVATE KEY-----
"""


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return write_key(tmp_path / "peer.key")


Write = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """Writes a config file into tmp_path and returns its path."""

    def write(text: str, name: str = "migrated.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def load(path: Path | None, key: Path, **overrides: object) -> Config:
    return load_config(path, {"peer_key_file": str(key), **overrides})


def error_of(path: Path | None, key: Path, **overrides: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, key, **overrides)
    assert isinstance(info.value, ValueError)
    return info.value


# --- defaults ----------------------------------------------------------------------------------


def test_built_in_defaults(key: Path) -> None:
    config = load(None, key)
    assert config.daemon.control_socket == Path("/run/migrated/control.sock")
    assert config.daemon.state_dir == Path("/var/lib/migrated")
    assert (config.daemon.log_format, config.daemon.log_level) == ("auto", "info")
    peer = config.peer
    assert peer.listen == HostPort("0.0.0.0", 7890)
    assert (peer.auth, peer.key_file, peer.psk) == ("psk", key, key.read_bytes())
    assert (peer.tls_cert, peer.tls_key, peer.tls_ca) == (None, None, None)
    assert peer.allow_unauthenticated is False
    assert peer.connect_timeout_s == 10
    assert config.vm.dirty_tracking == "auto"
    assert config.vm.ring_bytes == 1 << 20
    assert config.vm.harvest_interval_ms == 1.0
    assert config.vm.harvest_interval_s == 0.001
    m = config.migration
    assert (m.downtime_limit_ms, m.max_bandwidth_mib_s) == (300, 0)
    assert (m.max_rounds, m.timeout_s) == (30, 600)
    assert (m.on_no_convergence, m.verify, m.max_batch_bytes) == ("abort", "full", 8 << 20)
    assert config.source is None


def test_vm_defaults_agree_with_the_kvm_layer(write: Write, key: Path) -> None:
    from migrated.kvm import vm

    config = load(None, key).vm
    assert config.ring_bytes == vm.DEFAULT_RING_BYTES
    assert config.harvest_interval_s == pytest.approx(vm.HARVEST_INTERVAL_S)
    assert config.dirty_tracking in vm.DIRTY_TRACKING_MODES
    # The config's smallest ring is the VM layer's smallest.
    smallest = load(write(f"[vm]\nring_bytes = {vm.MIN_RING_BYTES}\n"), key)
    assert smallest.vm.ring_bytes == vm.MIN_RING_BYTES
    error_of(write(f"[vm]\nring_bytes = {vm.MIN_RING_BYTES // 2}\n"), key)


def test_config_is_frozen(key: Path) -> None:
    config = load(None, key)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.migration.max_rounds = 1  # type: ignore[misc]


def test_key_material_stays_out_of_repr(key: Path) -> None:
    config = load(None, key)
    assert config.peer.psk is not None
    assert repr(config.peer.psk) not in repr(config)


def test_no_key_file_with_psk_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {})
    err = info.value
    assert (err.source, err.key) == ("built-in default", "peer.key_file")
    assert 'required when peer.auth = "psk"' in str(err)
    assert "--peer-key-file" in str(err)


# --- the annotated file ------------------------------------------------------------------------


def test_annotated_file_equals_the_defaults(key: Path) -> None:
    # The one documented difference, key_file, is replaced by the override on both sides.
    assert load(ANNOTATED, key) == load(None, key)
    raw = tomllib.loads(ANNOTATED.read_text())
    assert raw["peer"]["key_file"] == "/etc/migrated/peer.key"


def test_annotated_file_documents_every_key() -> None:
    from migrated.config import _SCHEMA

    text = ANNOTATED.read_text()
    raw = tomllib.loads(text)
    for section, keys in _SCHEMA.items():
        assert f"[{section}]" in text
        for name in keys:
            if name in raw[section]:
                continue
            # Optional keys without a default appear commented out, with an example.
            assert re.search(rf"^# {name} = ", text, re.M), f"{section}.{name} is not documented"
    for section, table in raw.items():
        for name in table:
            block = text.split(f"\n{name} = ")[0].rsplit("\n\n", 1)[-1]
            assert "Allowed" in block or "allowed" in block, f"{section}.{name}: no allowed values"
            assert "Reload" in block or "reload" in block, f"{section}.{name}: reload not said"


def test_empty_file_is_all_defaults(write: Write, key: Path) -> None:
    path = write("")
    config = load(path, key)
    assert config == load(None, key)
    assert config.source == path


# --- validation errors: file, key, allowed -----------------------------------------------------

INVALID = [
    # (section, assignment, key, part of the allowed text)
    ("daemon", 'control_socket = "run/control.sock"', "daemon.control_socket", "absolute path"),
    ("daemon", f'control_socket = "/{"x" * 120}"', "daemon.control_socket", "at most 107 bytes"),
    ("daemon", "state_dir = 123", "daemon.state_dir", "an absolute path"),
    ("daemon", 'state_dir = ""', "daemon.state_dir", "an absolute path"),
    ("daemon", 'log_format = "xml"', "daemon.log_format", '"auto" | "json" | "console"'),
    ("daemon", 'log_level = "verbose"', "daemon.log_level", '"debug" | "info" | "warning"'),
    ("peer", 'listen = "7890"', "peer.listen", "HOST:PORT"),
    ("peer", 'listen = "0.0.0.0:0"', "peer.listen", "port 1-65535"),
    ("peer", 'listen = "0.0.0.0:65536"', "peer.listen", "port 1-65535"),
    ("peer", 'listen = "0.0.0.0:http"', "peer.listen", "port 1-65535"),
    ("peer", 'listen = ":7890"', "peer.listen", "HOST:PORT"),
    ("peer", 'listen = "::1:7890"', "peer.listen", "[IPv6] in brackets"),
    ("peer", 'listen = "[zz::1]:7890"', "peer.listen", "[IPv6] in brackets"),
    ("peer", 'listen = "300.1.1.1:7890"', "peer.listen", "IPv4 address"),
    ("peer", 'listen = "bad_host!:7890"', "peer.listen", "a name"),
    ("peer", "listen = 7890", "peer.listen", "HOST:PORT"),
    ("peer", 'auth = "kerberos"', "peer.auth", '"psk" | "tls" | "none"'),
    ("peer", 'allow_unauthenticated = "yes"', "peer.allow_unauthenticated", "true | false"),
    ("peer", "connect_timeout_s = 0", "peer.connect_timeout_s", "a number from 0.1 to 3600"),
    ("peer", 'connect_timeout_s = "10"', "peer.connect_timeout_s", "a number from 0.1 to 3600"),
    ("peer", "connect_timeout_s = true", "peer.connect_timeout_s", "a number from 0.1 to 3600"),
    ("peer", "connect_timeout_s = inf", "peer.connect_timeout_s", "a number from 0.1 to 3600"),
    ("peer", "connect_timeout_s = nan", "peer.connect_timeout_s", "a number from 0.1 to 3600"),
    ("peer", 'key_file = "peer.key"', "peer.key_file", "an absolute path"),
    ("peer", 'tls_cert = "cert.pem"', "peer.tls_cert", "an absolute path"),
    ("vm", 'dirty_tracking = "pml"', "vm.dirty_tracking", '"auto" | "ring" | "bitmap"'),
    ("vm", "ring_bytes = 1000000", "vm.ring_bytes", "a power of two from 4096 (4 KiB)"),
    ("vm", "ring_bytes = 2048", "vm.ring_bytes", "to 1048576 (1 MiB)"),
    ("vm", "ring_bytes = 2097152", "vm.ring_bytes", "a power of two"),
    ("vm", 'ring_bytes = "1M"', "vm.ring_bytes", "a power of two"),
    ("vm", "harvest_interval_ms = 0.05", "vm.harvest_interval_ms", "a number from 0.1 to 100"),
    ("vm", "harvest_interval_ms = 101", "vm.harvest_interval_ms", "a number from 0.1 to 100"),
    ("peer", "message_timeout_s = 0", "peer.message_timeout_s", "a number from 0.1 to 3600"),
    ("peer", "message_timeout_s = inf", "peer.message_timeout_s", "a number from 0.1 to 3600"),
    ("migration", "max_incoming = 0", "migration.max_incoming", "an integer from 1 to 1024"),
    ("migration", 'max_incoming = "4"', "migration.max_incoming", "an integer from 1 to 1024"),
    ("migration", "max_incoming_memory_mib = -1", "migration.max_incoming_memory_mib", "an integer from 0 to"),
    ("migration", "max_incoming_memory_mib = 1.5", "migration.max_incoming_memory_mib", "an integer from 0 to"),
    ("migration", "downtime_limit_ms = 0", "migration.downtime_limit_ms", "from 1 to 60000"),
    ("migration", "downtime_limit_ms = 60001", "migration.downtime_limit_ms", "from 1 to 60000"),
    ("migration", "downtime_limit_ms = 1.5", "migration.downtime_limit_ms", "an integer"),
    ("migration", "downtime_limit_ms = true", "migration.downtime_limit_ms", "an integer"),
    ("migration", "max_bandwidth_mib_s = -1", "migration.max_bandwidth_mib_s", "from 0 to"),
    ("migration", "max_rounds = 0", "migration.max_rounds", "an integer from 1 to 10000"),
    ("migration", "timeout_s = 0", "migration.timeout_s", "a number from 1 to 86400"),
    (
        "migration",
        'on_no_convergence = "slow"',
        "migration.on_no_convergence",
        '"abort" | "force-downtime" | "throttle" | "dirty-limit"',
    ),
    ("migration", 'verify = "partial"', "migration.verify", '"full" | "off"'),
    (
        "migration",
        "max_batch_bytes = 1048575",
        "migration.max_batch_bytes",
        "from 1048576 (1 MiB) to 67108864 (64 MiB)",
    ),
    (
        "migration",
        "max_batch_bytes = 67108865",
        "migration.max_batch_bytes",
        "from 1048576 (1 MiB) to 67108864 (64 MiB)",
    ),
]


@pytest.mark.parametrize(("section", "line", "dotted", "allowed"), INVALID)
def test_invalid_value_names_file_key_and_allowed(
    write: Write, key: Path, section: str, line: str, dotted: str, allowed: str
) -> None:
    path = write(f"[{section}]\n{line}\n")
    err = error_of(path, key) if dotted != "peer.key_file" else _error_without_override(path)
    assert err.source == str(path)
    assert err.key == dotted
    assert str(err).startswith(f"{path}: {dotted}: ")
    assert "(allowed: " in str(err)
    assert allowed in str(err)


def _error_without_override(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    return info.value


@pytest.mark.parametrize(
    ("listen", "host", "port", "text"),
    [
        ("[::1]:7890", "::1", 7890, "[::1]:7890"),
        ("[::]:1", "::", 1, "[::]:1"),
        ("127.0.0.1:65535", "127.0.0.1", 65535, "127.0.0.1:65535"),
        ("localhost:7890", "localhost", 7890, "localhost:7890"),
        ("node-2.example.org:7891", "node-2.example.org", 7891, "node-2.example.org:7891"),
    ],
)
def test_valid_listen_addresses(write: Write, key: Path, listen: str, host: str, port: int, text: str) -> None:
    config = load(write(f'[peer]\nlisten = "{listen}"\n'), key)
    assert config.peer.listen == HostPort(host, port)
    assert str(config.peer.listen) == text


def test_integers_are_accepted_where_numbers_are(write: Write, key: Path) -> None:
    config = load(write("[vm]\nharvest_interval_ms = 2\n[migration]\ntimeout_s = 30.5\n"), key)
    assert config.vm.harvest_interval_ms == 2.0
    assert config.migration.timeout_s == 30.5


def test_unknown_key_names_the_allowed_keys(write: Write, key: Path) -> None:
    path = write("[migration]\ndowntime_limit = 300\n")
    err = error_of(path, key)
    assert err.key == "migration.downtime_limit"
    assert str(err).startswith(f"{path}: migration.downtime_limit: unknown key")
    assert "did you mean 'downtime_limit_ms'?" in str(err)
    assert "(allowed: downtime_limit_ms, max_bandwidth_mib_s, max_rounds, timeout_s" in str(err)


def test_unknown_section(write: Write, key: Path) -> None:
    path = write("[migraton]\nmax_rounds = 3\n")
    err = error_of(path, key)
    assert str(err).startswith(f"{path}: migraton: unknown section [migraton]")
    assert "did you mean 'migration'?" in str(err)
    assert "(allowed: [daemon], [peer], [vm], [migration])" in str(err)


def test_section_that_is_not_a_table(write: Write, key: Path) -> None:
    err = error_of(write("daemon = 1\n"), key)
    assert (err.key, err.problem) == ("daemon", "must be a table")


def test_toml_syntax_error_names_the_file_and_line(write: Write, key: Path) -> None:
    path = write("[daemon]\nlog_level = \n")
    err = error_of(path, key)
    assert str(err).startswith(f"{path}: not valid TOML: ")
    assert "line 2" in str(err)


def test_invalid_utf8(write: Write, key: Path, tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[daemon]\nlog_level = "\xe9"\n')
    assert "not valid TOML" in str(error_of(path, key))


def test_missing_config_file(tmp_path: Path, key: Path) -> None:
    path = tmp_path / "absent.toml"
    err = error_of(path, key)
    assert str(err) == f"{path}: cannot read the configuration file: No such file or directory"


# --- [peer] authentication ---------------------------------------------------------------------


def test_psk_is_the_files_exact_bytes(tmp_path: Path) -> None:
    data = os.urandom(40) + b"\n"
    path = write_key(tmp_path / "k", data, 0o400)
    assert load_config(None, {"peer_key_file": str(path)}).peer.psk == data


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644, 0o700 | 0o010])
def test_key_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "k", mode=mode)
    with pytest.raises(ConfigError) as info:
        load_config(None, {"peer_key_file": str(path)})
    err = info.value
    assert err.key == "peer.key_file"
    assert err.source == "command line --peer-key-file"
    assert f"mode {mode:04o}" in str(err)
    assert f"chmod 600 {path}" in str(err)
    assert "mode 0600 or 0400" in str(err)


@pytest.mark.parametrize(
    ("size", "problem"), [(0, "holds 0 bytes"), (31, "holds 31 bytes"), (4097, "larger than 4096")]
)
def test_key_file_size(tmp_path: Path, size: int, problem: str) -> None:
    path = write_key(tmp_path / "k", os.urandom(size))
    with pytest.raises(ConfigError, match=problem) as info:
        load_config(None, {"peer_key_file": str(path)})
    assert "32 to 4096 bytes" in str(info.value)
    assert "head -c 32 /dev/urandom" in str(info.value)


def test_key_file_sizes_at_the_bounds(tmp_path: Path) -> None:
    for size in (32, 4096):
        path = write_key(tmp_path / f"k{size}", os.urandom(size))
        assert len(load_config(None, {"peer_key_file": str(path)}).peer.psk or b"") == size


def test_missing_key_file(write: Write, tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    path = write(f'[peer]\nkey_file = "{missing}"\n')
    err = _error_without_override(path)
    assert str(err).startswith(f"{path}: peer.key_file: cannot open {missing}: No such file")
    assert "(allowed: a regular file of 32 to 4096 bytes" in str(err)


def test_key_file_that_is_a_directory(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(None, {"peer_key_file": str(directory)})


def test_key_file_that_is_a_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(None, {"peer_key_file": str(fifo)})


def test_auth_none_needs_the_explicit_consent(write: Write, key: Path) -> None:
    path = write('[peer]\nauth = "none"\n')
    err = error_of(path, key)
    assert err.key == "peer.auth"
    assert str(err).startswith(f'{path}: peer.auth: "none" lets anyone who reaches peer.listen')
    assert "set peer.allow_unauthenticated = true" in str(err)
    assert str(err).endswith('(allowed: "psk" | "tls", or "none" together with allow_unauthenticated = true)')

    config = load_config(write('[peer]\nauth = "none"\nallow_unauthenticated = true\n'), {})
    assert (config.peer.auth, config.peer.psk) == ("none", None)


def test_key_file_is_not_read_unless_auth_is_psk(write: Write, tmp_path: Path) -> None:
    path = write(f'[peer]\nauth = "none"\nallow_unauthenticated = true\nkey_file = "{tmp_path}/absent"\n')
    assert load_config(path, {}).peer.psk is None


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    files = {"tls_cert": TLS_CERT, "tls_key": TLS_KEY, "tls_ca": TLS_CERT}
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_text(text)
        paths[name].chmod(0o600 if name == "tls_key" else 0o644)
    return paths


def tls_config(tls: dict[str, Path], **replace: Path) -> str:
    files = {**tls, **replace}
    return '[peer]\nauth = "tls"\n' + "".join(f'{k} = "{v}"\n' for k, v in files.items())


def test_tls_loads(write: Write, tls_files: dict[str, Path]) -> None:
    config = load_config(write(tls_config(tls_files)), {})
    assert config.peer.auth == "tls"
    assert config.peer.tls_key == tls_files["tls_key"]
    assert config.peer.psk is None


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key", "tls_ca"])
def test_tls_needs_all_three_files(write: Write, tls_files: dict[str, Path], missing: str) -> None:
    del tls_files[missing]
    path = write(tls_config(tls_files))
    err = _error_without_override(path)
    assert str(err).startswith(f'{path}: peer.{missing}: required when peer.auth = "tls"')
    assert "(allowed: an absolute path to a PEM file)" in str(err)


def test_tls_unreadable_file(write: Write, tls_files: dict[str, Path], tmp_path: Path) -> None:
    path = write(tls_config(tls_files, tls_ca=tmp_path / "absent.pem"))
    err = _error_without_override(path)
    assert err.key == "peer.tls_ca"
    assert "No such file or directory" in str(err)


def test_tls_key_readable_by_everyone_is_refused(write: Write, tls_files: dict[str, Path]) -> None:
    tls_files["tls_key"].chmod(0o644)
    err = _error_without_override(write(tls_config(tls_files)))
    assert err.key == "peer.tls_key"
    assert "mode 0644" in str(err)
    tls_files["tls_key"].chmod(0o640)  # a group such as ssl-cert may read it
    load_config(write(tls_config(tls_files)), {})


def test_tls_key_that_does_not_match_the_certificate(write: Write, tls_files: dict[str, Path]) -> None:
    tls_files["tls_key"].write_text(OTHER_KEY)
    err = _error_without_override(write(tls_config(tls_files)))
    assert err.key == "peer.tls_cert"
    assert "cannot load" in str(err)
    assert "its unencrypted PEM private key" in str(err)


def test_tls_ca_that_is_not_pem(write: Write, tls_files: dict[str, Path]) -> None:
    tls_files["tls_ca"].write_text("not a certificate\n")
    err = _error_without_override(write(tls_config(tls_files)))
    assert err.key == "peer.tls_ca"


# --- overrides ---------------------------------------------------------------------------------


def test_overrides_win_over_the_file(write: Write, tmp_path: Path, key: Path) -> None:
    other_key = write_key(tmp_path / "other.key")
    path = write(
        "[daemon]\n"
        f'control_socket = "{tmp_path}/a.sock"\nstate_dir = "{tmp_path}/a"\n'
        f'[peer]\nlisten = "127.0.0.1:7001"\nkey_file = "{key}"\n'
    )
    config = load_config(
        path,
        {
            "control_socket": tmp_path / "b.sock",
            "state_dir": str(tmp_path / "b"),
            "listen": "[::1]:7002",
            "peer_key_file": other_key,
        },
    )
    assert config.daemon.control_socket == tmp_path / "b.sock"
    assert config.daemon.state_dir == tmp_path / "b"
    assert config.peer.listen == HostPort("::1", 7002)
    assert config.peer.psk == other_key.read_bytes()


def test_override_none_means_not_given(write: Write, tmp_path: Path, key: Path) -> None:
    path = write(f'[peer]\nlisten = "127.0.0.1:7001"\nkey_file = "{key}"\n')
    config = load_config(path, {"listen": None, "control_socket": None})
    assert str(config.peer.listen) == "127.0.0.1:7001"
    assert config.daemon.control_socket == Path("/run/migrated/control.sock")


def test_relative_override_paths_are_taken_from_the_working_directory(
    tmp_path: Path, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"state_dir": "state", "control_socket": "c.sock", "peer_key_file": key.name})
    assert config.daemon.state_dir == tmp_path / "state"
    assert config.daemon.control_socket == tmp_path / "c.sock"
    assert config.peer.key_file == key


def test_invalid_override_names_the_flag(key: Path) -> None:
    err = error_of(None, key, listen="localhost")
    assert str(err).startswith("command line --listen: peer.listen: ")
    assert "(allowed: HOST:PORT" in str(err)


def test_unknown_override(key: Path) -> None:
    err = error_of(None, key, log_format="json")
    assert err.key == "log_format"
    assert "control_socket, state_dir, listen, metrics_listen, peer_key_file, log_level" in str(err)


def test_log_level_override_wins_and_is_checked(write: Write, key: Path) -> None:
    config = load(write('[daemon]\nlog_level = "warning"\n'), key, log_level="debug")
    assert config.daemon.log_level == "debug"
    err = error_of(None, key, log_level="loud")
    assert err.source == "command line --log-level" and err.key == "daemon.log_level", err


# --- reload ------------------------------------------------------------------------------------


def test_no_change_no_diff(write: Write, key: Path) -> None:
    path = write("")
    assert load(path, key).reloadable_diff(load(path, key)) == []


def test_reloadable_diff(write: Write, key: Path, tmp_path: Path) -> None:
    old = load(write(""), key)
    new = load(
        write(
            '[daemon]\nlog_level = "debug"\nlog_format = "json"\n'
            f'state_dir = "{tmp_path}/s"\ncontrol_socket = "{tmp_path}/c.sock"\n'
            '[peer]\nlisten = "127.0.0.1:7891"\nconnect_timeout_s = 3\n'
            "[vm]\nring_bytes = 65536\n"
            "[migration]\ndowntime_limit_ms = 100\nmax_rounds = 5\n",
            "new.toml",
        ),
        key,
    )
    assert old.reloadable_diff(new) == [
        f'daemon.control_socket: "/run/migrated/control.sock" -> "{tmp_path}/c.sock" (needs a restart)',
        f'daemon.state_dir: "/var/lib/migrated" -> "{tmp_path}/s" (needs a restart)',
        'daemon.log_format: "auto" -> "json" (applied on reload)',
        'daemon.log_level: "info" -> "debug" (applied on reload)',
        'peer.listen: "0.0.0.0:7890" -> "127.0.0.1:7891" (needs a restart)',
        "peer.connect_timeout_s: 10.0 -> 3.0 (applied on reload)",
        "vm.ring_bytes: 1048576 -> 65536 (applied on reload)",
        "migration.downtime_limit_ms: 300 -> 100 (applied on reload)",
        "migration.max_rounds: 30 -> 5 (applied on reload)",
    ]
    changes = {c.key: c for c in old.changes(new)}
    assert changes["migration.max_rounds"].old == 30
    assert changes["migration.max_rounds"].new == 5
    assert not changes["peer.listen"].reloadable


def test_apply_reload_keeps_what_needs_a_restart(write: Write, key: Path) -> None:
    old = load(write(""), key)
    text = '[daemon]\nlog_level = "debug"\n[peer]\nlisten = "127.0.0.1:1"\n'
    new = load(write(text, "n.toml"), key)
    applied = old.apply_reload(new)
    assert applied.daemon.log_level == "debug"
    assert applied.peer.listen == old.peer.listen
    assert applied.source == new.source
    assert old.reloadable_diff(applied) == ['daemon.log_level: "info" -> "debug" (applied on reload)']


def test_rotated_key_contents_show_without_the_key(tmp_path: Path, key: Path) -> None:
    old = load(None, key)
    write_key(key)  # same path, new bytes
    new = load(None, key)
    assert old.reloadable_diff(new) == ["peer.key_file: contents changed (needs a restart)"]
    assert old.apply_reload(new).peer.psk == old.peer.psk
    for text in old.reloadable_diff(new):
        assert repr(new.peer.psk) not in text


def test_auth_change_needs_a_restart(write: Write, key: Path) -> None:
    old = load(write(""), key)
    new = load(write('[peer]\nauth = "none"\nallow_unauthenticated = true\n', "n.toml"), key)
    diff = old.reloadable_diff(new)
    assert 'peer.auth: "psk" -> "none" (needs a restart)' in diff
    assert "peer.allow_unauthenticated: false -> true (needs a restart)" in diff
    assert old.apply_reload(new).peer == old.peer
