"""The daemon's configuration: one TOML file, validated into frozen dataclasses.

Rules of this file:

- Every key has its default in `_SCHEMA`, run through the same check as a value from the file, so
  a default can never be invalid. `config/migrated.toml` documents every key; a test holds the two
  equal.
- Every error names where the value came from (the file, a command-line override, or the built-in
  default), the dotted key and what is allowed: an operator fixes it without reading this code.
- Unknown sections and keys are errors: a typo must never fall back silently to a default.
- Files the configuration points at (the pre-shared key, TLS certificates) are checked and the key
  is read here, when the daemon starts or reloads, so a bad key stops the start instead of failing
  the first migration hours later.
- Each key says whether SIGHUP may apply it. "Reloadable" means the daemon reads the value from
  the current `Config` each time it uses it (a new VM, a new migration, a new outgoing connection,
  the next log line); everything bound once at start-up (sockets, directories, the listener's
  credentials) needs a restart.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import grp
import ipaddress
import json
import math
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Config",
    "ConfigChange",
    "ConfigError",
    "DaemonConfig",
    "HostPort",
    "KeyReference",
    "LOG_LEVELS",
    "MigrationConfig",
    "OVERRIDES",
    "PeerConfig",
    "VmDefaults",
    "builtin_default",
    "load_config",
    "schema_reference",
]

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error", "critical")
PeerAuth = Literal["psk", "tls", "none"]
DirtyTracking = Literal["auto", "ring", "bitmap"]
MemoryBacking = Literal["memfd", "shmem-huge", "hugetlbfs"]
NoConvergence = Literal["abort", "force-downtime", "throttle", "dirty-limit"]
Verify = Literal["full", "off"]

KIB = 1024
MIB = 1024 * KIB
PSK_MIN_BYTES = 32  # 256 bits: the HMAC key is the only thing between a stranger and guest RAM
PSK_MAX_BYTES = 4096  # a key, not a file someone pointed at by mistake; also bounds the read
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL


DEFAULT_CONTROL_SOCKET = Path("/run/migrated/control.sock")


class ConfigError(ValueError):
    """A configuration value is wrong: the message names the source, the key and what is allowed."""

    def __init__(self, source: str, key: str | None, problem: str, allowed: str | None = None):
        self.source = source
        self.key = key
        self.problem = problem
        self.allowed = allowed
        text = f"{source}: {key}: {problem}" if key else f"{source}: {problem}"
        super().__init__(f"{text} (allowed: {allowed})" if allowed else text)


@dataclass(frozen=True, slots=True)
class HostPort:
    """A TCP endpoint; `host` carries no brackets (what `trio.serve_tcp` and `connect` want)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    control_socket: Path
    state_dir: Path
    log_format: LogFormat
    log_level: LogLevel
    metrics_listen: HostPort | None  # None: no metrics endpoint
    # None: the socket stays 0600, root (the daemon's user) only; a group name: 0660 and that group.
    control_socket_group: str | None = None


@dataclass(frozen=True, slots=True)
class PeerConfig:
    listen: HostPort
    auth: PeerAuth
    key_file: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_ca: Path | None
    allow_unauthenticated: bool
    connect_timeout_s: float
    message_timeout_s: float
    # Source: keep one authenticated link to each peer migrated to, for the next migration there.
    warm_links: bool = True
    # Target: how long an idle link (a source's warm link) may wait for its first message.
    idle_link_timeout_s: float = 60.0
    max_idle_links: int = 16  # target: idle links from all peers together
    max_idle_links_per_peer: int = 2  # target: idle links from one peer address
    # The key file's exact bytes, read once at load (no second read that could see another file).
    psk: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class VmDefaults:
    """Defaults for VMs created from now on; a running VM keeps what it was created with."""

    dirty_tracking: DirtyTracking
    ring_bytes: int
    harvest_interval_ms: float
    max_memory_overcommit: float  # times the host's RAM, all of this daemon's VMs together
    max_vcpu_overcommit: float  # times the host's CPUs
    memory_backing: MemoryBacking = "memfd"
    # "shmem-huge" RAM files; None: <state_dir>/ram, a tmpfs the daemon mounts (rammount.py)
    memory_backing_dir: Path | None = None
    # The RAM files of VMs that left, zeroed and kept for the next VM (kvm/ramreserve.py): at most
    # this many MiB of their pages together (0: off), each for at most ram_reserve_hold_s.
    ram_reserve_mib: int = 2048
    ram_reserve_hold_s: float = 60.0

    @property
    def harvest_interval_s(self) -> float:
        return self.harvest_interval_ms / 1000


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    """Defaults for migrations started from now on."""

    downtime_limit_ms: int
    max_bandwidth_mib_s: float  # 0 = unlimited
    max_rounds: int
    timeout_s: float
    on_no_convergence: NoConvergence
    verify: Verify
    max_batch_bytes: int
    streams: int  # data connections (each in its own thread) that carry the pages
    downtime_guard_ms: int  # beyond downtime_limit_ms: how long the source may stay paused before COMMIT
    downtime_realtime: bool  # the downtime's threads at SCHED_FIFO for the window (realtime.py)
    downtime_idle_polling: bool  # idle CPUs poll while a downtime window is open (cpulatency.py)
    vcpu_nice: int  # the source guest's vCPU threads at this nice value while it migrates (vcpupriority.py)
    vcpu_sched_idle_s: float  # ... and under SCHED_IDLE for up to this long, never past the pause (0: off)
    completion_timeout_per_gib_s: float  # 0: off; else the whole migration may take this per GiB of RAM
    progress_timeout_s: float  # 0: off; else no byte moved for this long cancels the migration
    max_incoming: int
    max_incoming_memory_mib: int  # 0 = this host's physical memory
    warm_vm_shell: bool = True  # one empty VM kept ready for the next incoming one (vmshell.py)

    @property
    def max_incoming_memory_bytes(self) -> int:
        if self.max_incoming_memory_mib:
            return self.max_incoming_memory_mib * MIB
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class ConfigChange:
    key: str  # dotted, e.g. "migration.downtime_limit_ms"
    old: Any
    new: Any
    reloadable: bool

    def __str__(self) -> str:
        if self.key == "peer.key_file" and self.old == self.new:
            what = "contents changed"  # never print key material
        else:
            what = f"{_show(self.old)} -> {_show(self.new)}"
        how = "applied on reload" if self.reloadable else "needs a restart"
        return f"{self.key}: {what} ({how})"


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig
    peer: PeerConfig
    vm: VmDefaults
    migration: MigrationConfig
    source: Path | None = field(default=None, compare=False)

    def changes(self, new: Config) -> list[ConfigChange]:
        """Every key whose value differs in `new`, in schema order."""
        found = []
        for section, keys in _SCHEMA.items():
            old_part, new_part = getattr(self, section), getattr(new, section)
            for key, spec in keys.items():
                old, now = getattr(old_part, key), getattr(new_part, key)
                if old != now or (key == "key_file" and _key_rotated(old_part, new_part)):
                    found.append(ConfigChange(f"{section}.{key}", old, now, spec.reloadable))
        return found

    def reloadable_diff(self, new: Config) -> list[str]:
        """One line per changed key, saying whether SIGHUP applies it or it needs a restart."""
        return [str(change) for change in self.changes(new)]

    def apply_reload(self, new: Config) -> Config:
        """What SIGHUP puts into effect: `new`, but keys that need a restart keep their value."""
        parts = {}
        for section, keys in _SCHEMA.items():
            old_part = getattr(self, section)
            fixed = {k: getattr(old_part, k) for k, spec in keys.items() if not spec.reloadable}
            if section == "peer":
                fixed["psk"] = self.peer.psk  # belongs to key_file, which needs a restart
            parts[section] = dataclasses.replace(getattr(new, section), **fixed)
        return Config(**parts, source=new.source)


def _key_rotated(old: PeerConfig, new: PeerConfig) -> bool:
    # None on either side: auth changed, which is reported on its own.
    return old.psk is not None and new.psk is not None and old.psk != new.psk


# ---------------------------------------------------------------------------------------------
# Checks: each takes a raw TOML value and returns the typed value or raises _Invalid.


class _Invalid(Exception):
    def __init__(self, problem: str, allowed: str) -> None:
        self.problem = problem
        self.allowed = allowed


Check = Callable[[Any], Any]


def _show(value: Any) -> str:
    """A value as the operator wrote it in TOML."""
    if isinstance(value, (Path, HostPort)):
        value = str(value)
    return json.dumps(value, default=str)


def _size(n: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n} ({n // scale} {unit})"
    return str(n)


def _plain(number: float) -> str:
    """1048576, not 1.04858e+06: a bound the operator can copy."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def _one_of(*choices: str) -> Check:
    allowed = " | ".join(f'"{c}"' for c in choices)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(f"{_show(value)} is not one of the choices", allowed)
        return value

    return check


def _integer(low: int, high: int, *, sizes: bool = False) -> Check:
    show = _size if sizes else str
    allowed = f"an integer from {show(low)} to {show(high)}"

    def check(value: Any) -> int:
        # bool is an int in Python, but `true` is not a number in TOML.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"{_show(value)} is not an integer", allowed)
        if not low <= value <= high:
            raise _Invalid(f"{show(value)} is out of range", allowed)
        return value

    return check


def _number(low: float, high: float) -> Check:
    allowed = f"a number from {_plain(low)} to {_plain(high)}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"{_show(value)} is not a number", allowed)
        if not math.isfinite(value) or not low <= value <= high:  # TOML has inf and nan
            raise _Invalid(f"{value} is out of range", allowed)
        return float(value)

    return check


def _power_of_two(low: int, high: int) -> Check:
    allowed = f"a power of two from {_size(low)} to {_size(high)}"
    as_integer = _integer(low, high, sizes=True)

    def check(value: Any) -> int:
        try:
            value = as_integer(value)
        except _Invalid as err:
            raise _Invalid(err.problem, allowed) from None
        if value & (value - 1):
            raise _Invalid(f"{value} is not a power of two", allowed)
        return int(value)

    return check


def _group(value: Any) -> str:
    """A group that exists on this host, checked at load so a typo stops the start."""
    allowed = "the name of a group in the host's group database (getent group NAME)"
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Invalid(f"{_show(value)} is not a group name", allowed)
    try:
        grp.getgrnam(value)
    except KeyError:
        raise _Invalid(f"there is no group {_show(value)} on this host", allowed) from None
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"{_show(value)} is not a boolean", "true | false")
    return value


def _path(*, socket: bool = False) -> Check:
    allowed = "an absolute path"
    if socket:
        allowed += f" of at most {SUN_PATH_MAX} bytes, the limit of a Unix socket address"

    def check(value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise _Invalid(f"{_show(value)} is not a path", allowed)
        if "\0" in value or not value.startswith("/"):
            # Relative to what? The daemon's working directory is / under systemd.
            raise _Invalid(f"{_show(value)} is not an absolute path", allowed)
        if socket and len(os.fsencode(value)) > SUN_PATH_MAX:
            raise _Invalid(f"{_show(value)} is {len(os.fsencode(value))} bytes long", allowed)
        return Path(value)

    return check


_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _listen(value: Any) -> HostPort:
    allowed = "HOST:PORT, port 1-65535; HOST an IPv4 address, [IPv6] in brackets or a name"
    if not isinstance(value, str):
        raise _Invalid(f"{_show(value)} is not a string", allowed)
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise _Invalid(f"{_show(value)} has no HOST:PORT form", allowed)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _Invalid(f"{_show(value)} has no port from 1 to 65535", allowed)
    if host.startswith("[") and host.endswith("]"):
        try:
            return HostPort(str(ipaddress.IPv6Address(host[1:-1])), int(port_text))
        except ValueError:
            raise _Invalid(f"{_show(value)}: {host} is no IPv6 address", allowed) from None
    if ":" in host:
        raise _Invalid(f"{_show(value)}: an IPv6 address needs brackets, e.g. [::1]:7890", allowed)
    labels = host.split(".")
    if all(label.isdigit() for label in labels):  # looks like IPv4: must be one
        try:
            return HostPort(str(ipaddress.IPv4Address(host)), int(port_text))
        except ValueError:
            raise _Invalid(f"{_show(value)}: {host} is no IPv4 address", allowed) from None
    if len(host) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise _Invalid(f"{_show(value)}: {host} is no host name", allowed)
    return HostPort(host, int(port_text))


# ---------------------------------------------------------------------------------------------
# The schema: every section and key, its default (raw, as in TOML), check and reloadability.


@dataclass(frozen=True, slots=True)
class _Key:
    default: Any  # None: optional, no default
    check: Check
    reloadable: bool


_SCHEMA: dict[str, dict[str, _Key]] = {
    "daemon": {
        "control_socket": _Key(str(DEFAULT_CONTROL_SOCKET), _path(socket=True), False),
        "state_dir": _Key("/var/lib/migrated", _path(), False),
        "log_format": _Key("auto", _one_of("auto", "json", "console"), True),
        "log_level": _Key("info", _one_of(*LOG_LEVELS), True),
        "metrics_listen": _Key(None, _listen, False),
        "control_socket_group": _Key(None, _group, False),
    },
    "peer": {
        "listen": _Key("0.0.0.0:7890", _listen, False),
        "auth": _Key("psk", _one_of("psk", "tls", "none"), False),
        "key_file": _Key(None, _path(), False),
        "tls_cert": _Key(None, _path(), False),
        "tls_key": _Key(None, _path(), False),
        "tls_ca": _Key(None, _path(), False),
        "allow_unauthenticated": _Key(False, _boolean, False),
        "connect_timeout_s": _Key(10, _number(0.1, 3600), True),
        "message_timeout_s": _Key(60, _number(0.1, 3600), True),
        "warm_links": _Key(True, _boolean, True),
        "idle_link_timeout_s": _Key(60, _number(0.1, 3600), True),
        "max_idle_links": _Key(16, _integer(0, 1024), True),
        "max_idle_links_per_peer": _Key(2, _integer(0, 64), True),
    },
    "vm": {
        "dirty_tracking": _Key("auto", _one_of("auto", "ring", "bitmap"), True),
        # 4 KiB: the kernel's minimum (a page); 1 MiB: KVM_DIRTY_RING_MAX_ENTRIES (65536) * 16.
        "ring_bytes": _Key(1 * MIB, _power_of_two(4 * KIB, 1 * MIB), True),
        "harvest_interval_ms": _Key(1.0, _number(0.1, 100), True),
        "max_memory_overcommit": _Key(1.5, _number(0.1, 100), True),
        "max_vcpu_overcommit": _Key(8, _number(0.1, 1000), True),
        "memory_backing": _Key("memfd", _one_of("memfd", "shmem-huge", "hugetlbfs"), True),
        "memory_backing_dir": _Key(None, _path(), False),
        # 2**30 MiB: 1 EiB, far beyond any host; 0 keeps nothing.
        "ram_reserve_mib": _Key(2048, _integer(0, 1 << 30), True),
        "ram_reserve_hold_s": _Key(60, _number(0, 86_400), True),
    },
    "migration": {
        "downtime_limit_ms": _Key(300, _integer(1, 60_000), True),
        "max_bandwidth_mib_s": _Key(0, _number(0, 1024 * 1024), True),
        "max_rounds": _Key(30, _integer(1, 10_000), True),
        "timeout_s": _Key(600, _number(1, 86_400), True),
        "on_no_convergence": _Key("abort", _one_of("abort", "force-downtime", "throttle", "dirty-limit"), True),
        "verify": _Key("full", _one_of("full", "off"), True),
        "max_batch_bytes": _Key(8 * MIB, _integer(1 * MIB, 64 * MIB, sizes=True), True),
        # 16: transport.datastream.MAX_STREAMS, the most a target accepts.
        "streams": _Key(2, _integer(1, 16), True),
        "downtime_guard_ms": _Key(2000, _integer(0, 600_000), True),
        "downtime_realtime": _Key(True, _boolean, True),
        "downtime_idle_polling": _Key(True, _boolean, True),
        "vcpu_nice": _Key(10, _integer(0, 19), True),
        "vcpu_sched_idle_s": _Key(1.0, _number(0, 600), True),
        "completion_timeout_per_gib_s": _Key(0, _number(0, 86_400), True),
        "progress_timeout_s": _Key(150, _number(0, 86_400), True),
        "max_incoming": _Key(4, _integer(1, 1024), True),
        # 2**30 MiB: 1 EiB, far beyond any host; 0 means "this host's physical memory".
        "max_incoming_memory_mib": _Key(0, _integer(0, 1 << 30), True),
        "warm_vm_shell": _Key(True, _boolean, True),
    },
}

# Command-line overrides: what differs between two daemons on one machine, and the log level.
OVERRIDES: dict[str, tuple[str, str]] = {
    "control_socket": ("daemon", "control_socket"),
    "state_dir": ("daemon", "state_dir"),
    "listen": ("peer", "listen"),
    "metrics_listen": ("daemon", "metrics_listen"),
    "peer_key_file": ("peer", "key_file"),
    "log_level": ("daemon", "log_level"),
}
_PATH_OVERRIDES = {"control_socket", "state_dir", "peer_key_file"}

_DEFAULT_SOURCE = "built-in default"


@dataclass(frozen=True, slots=True)
class KeyReference:
    """One key as the configuration reference (docs/configuration.md) and `--help` show it."""

    section: str
    key: str
    default: Any  # raw, as written in TOML; None: no built-in default
    allowed: str
    reloadable: bool
    override: str | None  # the command-line option that overrides it, if any


def schema_reference() -> list[KeyReference]:
    """Every key of the schema, in schema order."""
    flags = {f"{section}.{key}": f"--{name.replace('_', '-')}" for name, (section, key) in OVERRIDES.items()}
    found = []
    for section, keys in _SCHEMA.items():
        for key, spec in keys.items():
            found.append(
                KeyReference(
                    section, key, spec.default, _allowed(spec.check), spec.reloadable, flags.get(f"{section}.{key}")
                )
            )
    return found


def builtin_default(dotted: str) -> Any:
    """The built-in default of "section.key", raw as in TOML (None: there is none)."""
    section, _, key = dotted.partition(".")
    return _SCHEMA[section][key].default


class _Unacceptable:
    """A value of no TOML type: every check refuses it, and refusing names what it allows."""


def _allowed(check: Check) -> str:
    try:
        check(_Unacceptable())
    except _Invalid as err:
        return err.allowed
    raise AssertionError(f"{check} accepted a value of no TOML type")


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read `path` (None: built-in defaults only), apply `overrides`, validate, read the key.

    `overrides` maps names of `OVERRIDES` to values from the command line; None means "not given".
    Relative paths there are taken from the current directory, unlike in the file.
    """
    file_source = str(path) if path is not None else _DEFAULT_SOURCE
    raw = _read_toml(path) if path is not None else {}
    origin: dict[str, str] = {}
    tables: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in _SCHEMA:
            hint = _did_you_mean(section, _SCHEMA)
            raise ConfigError(
                file_source,
                section,
                f"unknown section [{section}]{hint}",
                ", ".join(f"[{s}]" for s in _SCHEMA),
            )
        if not isinstance(table, dict):
            raise ConfigError(file_source, section, "must be a table", f"a [{section}] section")
        for key in table:
            if key not in _SCHEMA[section]:
                hint = _did_you_mean(key, _SCHEMA[section])
                raise ConfigError(
                    file_source,
                    f"{section}.{key}",
                    f"unknown key{hint}",
                    ", ".join(_SCHEMA[section]),
                )
            origin[f"{section}.{key}"] = file_source
        tables[section] = dict(table)

    for name, value in (overrides or {}).items():
        if name not in OVERRIDES:
            raise ConfigError("overrides", name, "unknown override", ", ".join(OVERRIDES))
        if value is None:
            continue
        section, key = OVERRIDES[name]
        if name in _PATH_OVERRIDES:
            value = str(Path(value).absolute())
        tables.setdefault(section, {})[key] = value
        origin[f"{section}.{key}"] = f"command line --{name.replace('_', '-')}"

    values: dict[str, dict[str, Any]] = {}
    for section, keys in _SCHEMA.items():
        values[section] = {}
        for key, spec in keys.items():
            given = tables.get(section, {})
            value = given[key] if key in given else spec.default
            if value is None:
                values[section][key] = None
                continue
            try:
                values[section][key] = spec.check(value)
            except _Invalid as err:
                where = origin.get(f"{section}.{key}", _DEFAULT_SOURCE)
                raise ConfigError(where, f"{section}.{key}", err.problem, err.allowed) from None

    def source_of(key: str) -> str:
        return origin.get(key, file_source)

    values["peer"]["psk"] = _check_peer_auth(values["peer"], source_of)
    return Config(
        daemon=DaemonConfig(**values["daemon"]),
        peer=PeerConfig(**values["peer"]),
        vm=VmDefaults(**values["vm"]),
        migration=MigrationConfig(**values["migration"]),
        source=path,
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        problem = f"cannot read the configuration file: {err.strerror}"
        raise ConfigError(str(path), None, problem) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), None, f"not valid TOML: {err}", "TOML 1.0, UTF-8") from None


def _did_you_mean(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_peer_auth(peer: dict[str, Any], source_of: Callable[[str], str]) -> bytes | None:
    """Cross-key rules of [peer]; returns the pre-shared key when auth = "psk"."""
    auth = peer["auth"]
    if auth == "none" and not peer["allow_unauthenticated"]:
        raise ConfigError(
            source_of("peer.auth"),
            "peer.auth",
            '"none" lets anyone who reaches peer.listen send VMs to this host and receive them '
            "from it; set peer.allow_unauthenticated = true if that is really intended",
            '"psk" | "tls", or "none" together with allow_unauthenticated = true',
        )
    if auth == "psk":
        if peer["key_file"] is None:
            raise ConfigError(
                source_of("peer.auth"),
                "peer.key_file",
                'required when peer.auth = "psk"',
                "an absolute path to the pre-shared key, here or as --peer-key-file",
            )
        return _read_psk(peer["key_file"], source_of("peer.key_file"))
    if auth == "tls":
        for key in ("tls_cert", "tls_key", "tls_ca"):
            if peer[key] is None:
                raise ConfigError(
                    source_of("peer.auth"),
                    f"peer.{key}",
                    'required when peer.auth = "tls"',
                    "an absolute path to a PEM file",
                )
        _check_tls(peer, source_of)
    return None


def _open_regular(path: Path) -> int:
    # O_NONBLOCK: a FIFO where the key should be must not hang the daemon's start.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def _read_psk(path: Path, source: str) -> bytes:
    allowed = (
        f"a regular file of {PSK_MIN_BYTES} to {PSK_MAX_BYTES} bytes, readable by the daemon and "
        f"by nobody else (mode 0600 or 0400); make one with: "
        f"(umask 077; head -c {PSK_MIN_BYTES} /dev/urandom > {path})"
    )
    try:
        fd = _open_regular(path)
    except OSError as err:
        problem = f"cannot open {path}: {err.strerror}"
        raise ConfigError(source, "peer.key_file", problem, allowed) from None
    try:
        # The mode of the file we read, not of whatever the path named a moment earlier.
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            raise ConfigError(
                source,
                "peer.key_file",
                f"{path} has mode {mode:04o}: group or others may access the key, and whoever "
                f"reads it can impersonate a peer; run: chmod 600 {path}",
                allowed,
            )
        chunks = []
        size = 0
        while size <= PSK_MAX_BYTES and (chunk := os.read(fd, PSK_MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        problem = f"cannot read {path}: {err.strerror}"
        raise ConfigError(source, "peer.key_file", problem, allowed) from None
    finally:
        os.close(fd)
    key = b"".join(chunks)
    if len(key) < PSK_MIN_BYTES:
        raise ConfigError(source, "peer.key_file", f"{path} holds {len(key)} bytes, too few for a key", allowed)
    if len(key) > PSK_MAX_BYTES:
        raise ConfigError(
            source,
            "peer.key_file",
            f"{path} is larger than {PSK_MAX_BYTES} bytes: is it the key?",
            allowed,
        )
    return key


def _check_tls(peer: dict[str, Any], source_of: Callable[[str], str]) -> None:
    """Load the files into a throwaway context: a broken or mismatched pair stops the start."""
    for key in ("tls_cert", "tls_key", "tls_ca"):
        try:
            os.close(_open_regular(peer[key]))
        except OSError as err:
            raise ConfigError(
                source_of(f"peer.{key}"),
                f"peer.{key}",
                f"cannot open {peer[key]}: {err.strerror}",
                "a regular PEM file readable by the daemon",
            ) from None
    mode = stat.S_IMODE(os.stat(peer["tls_key"]).st_mode)
    if mode & 0o007:
        # Group access is allowed: Debian's ssl-cert group is the usual way to share keys.
        raise ConfigError(
            source_of("peer.tls_key"),
            "peer.tls_key",
            f"{peer['tls_key']} has mode {mode:04o}: everyone may read the private key",
            f"mode 0600 or 0640; run: chmod o= {peer['tls_key']}",
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback that answers "" so an encrypted key fails instead of prompting.
        context.load_cert_chain(peer["tls_cert"], peer["tls_key"], password=lambda: b"")
    except ssl.SSLError as err:
        raise ConfigError(
            source_of("peer.tls_cert"),
            "peer.tls_cert",
            f"cannot load {peer['tls_cert']} with the key {peer['tls_key']}: {err.reason or err}",
            "a PEM certificate (chain) and its unencrypted PEM private key",
        ) from None
    try:
        context.load_verify_locations(cafile=peer["tls_ca"])
    except ssl.SSLError as err:
        raise ConfigError(
            source_of("peer.tls_ca"),
            "peer.tls_ca",
            f"cannot load {peer['tls_ca']}: {err.reason or err}",
            "PEM CA certificates that signed the peers' certificates",
        ) from None
