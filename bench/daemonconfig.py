"""Daemon settings given on a bench's command line (`--daemon-config SECTION.KEY=VALUE`) as the
TOML file the daemons are started with; shared by the benches that start daemons."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path


def write_daemon_config(path: Path, settings: list[str]) -> Path:
    """SECTION.KEY=VALUE settings as a TOML file (VALUE in TOML, a bare word as a string)."""
    sections: dict[str, list[str]] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise SystemExit(f"--daemon-config {setting!r}: SECTION.KEY=VALUE, e.g. migration.streams=4")
        value = value.strip()
        try:
            tomllib.loads(f"v = {value}")
        except tomllib.TOMLDecodeError:
            value = json.dumps(value)  # a bare word: a TOML string
        sections.setdefault(section, []).append(f"{name} = {value}")
    path.write_text("".join(f"[{s}]\n" + "".join(f"{line}\n" for line in lines) for s, lines in sections.items()))
    tomllib.loads(path.read_text())  # a setting that breaks the file fails here, not in a daemon
    return path
