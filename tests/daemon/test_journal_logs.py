"""Log lines carry a syslog priority prefix exactly when stderr is journald's stream.

journald itself is not running on the host (no systemd as PID 1 here): these tests hold the
detection and the prefixes against a real file whose device and inode JOURNAL_STREAM names, as
systemd sets it. The systemd lane (.ci/systemd) checks the PRIORITY journald records from them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from migrated.logs import configure_logging, get_logger, is_journal_stream


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    configure_logging("auto", "info")


def stream_id(stream: TextIO) -> str:
    info = os.fstat(stream.fileno())
    return f"{info.st_dev}:{info.st_ino}"


def log_every_level(path: Path, monkeypatch: pytest.MonkeyPatch, journal_stream: str | None, fmt: str) -> list[str]:
    with path.open("w") as stream:
        if journal_stream is not None:
            monkeypatch.setenv("JOURNAL_STREAM", journal_stream if journal_stream else stream_id(stream))
        else:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        configure_logging(fmt, "debug", stream=stream)
        log = get_logger(vm="web-1")
        log.debug("harvest_tick")
        log.info("vm_created")
        log.warning("harvester_realtime_unavailable")
        log.error("config_reload_refused")
        log.critical("daemon_crashed")
    return path.read_text().splitlines()


def test_json_lines_get_sd_daemon_priorities_on_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = log_every_level(tmp_path / "journal", monkeypatch, "", "json")
    prefixes = [line[:3] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>"], lines
    events = [json.loads(line[3:]) for line in lines]
    assert [e["event"] for e in events] == [
        "harvest_tick",
        "vm_created",
        "harvester_realtime_unavailable",
        "config_reload_refused",
        "daemon_crashed",
    ]
    assert all(e["vm"] == "web-1" for e in events)


def test_console_lines_get_the_prefix_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = log_every_level(tmp_path / "journal", monkeypatch, "", "console")
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"], lines
    assert "vm_created" in lines[1]


def test_no_prefix_without_journal_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = log_every_level(tmp_path / "plain", monkeypatch, None, "json")
    assert len(lines) == 5
    assert all(line.startswith("{") for line in lines), lines


def test_no_prefix_when_stderr_was_redirected_away_from_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that inherited JOURNAL_STREAM but writes to another file: plain lines."""
    with (tmp_path / "other").open("w") as other:
        elsewhere = stream_id(other)
    lines = log_every_level(tmp_path / "redirected", monkeypatch, elsewhere, "json")
    assert len(lines) == 5
    assert all(line.startswith("{") for line in lines), lines


@pytest.mark.parametrize("value", ["", "12", "a:b", "12:", ":34", "1:2:3"])
def test_malformed_journal_stream_is_not_the_journal(tmp_path: Path, value: str) -> None:
    with (tmp_path / "f").open("w") as stream:
        assert not is_journal_stream(stream, {"JOURNAL_STREAM": value})
        assert is_journal_stream(stream, {"JOURNAL_STREAM": stream_id(stream)})
