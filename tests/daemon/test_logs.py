"""migrated.logs: JSON lines with event, level, timestamp and bound fields; reconfigurable."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, UTC
from typing import Any

import pytest

from migrated.logs import configure_logging, get_logger


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root_level = logging.getLogger().level
    yield
    configure_logging("auto", "info")
    logging.getLogger().setLevel(root_level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_json_lines_carry_event_level_timestamp_and_bound_fields() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    log = get_logger(vm="web-1", migration_id="m-42")
    before = datetime.now(UTC)
    log.info("migration_started", peer="10.0.0.2:7890", round=1)
    log.warning("round_slow", round=2, dirty_rate_pages_s=12345.5)
    after = datetime.now(UTC)

    first, second = json_lines(stream)
    assert first["event"] == "migration_started"
    assert first["level"] == "info"
    assert (first["vm"], first["migration_id"], first["peer"], first["round"]) == (
        "web-1",
        "m-42",
        "10.0.0.2:7890",
        1,
    )
    assert (second["event"], second["level"], second["dirty_rate_pages_s"]) == (
        "round_slow",
        "warning",
        12345.5,
    )
    for line in (first, second):
        # ISO 8601 in UTC, with the Z suffix.
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["timestamp"])
        stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
        assert before - timedelta(seconds=1) <= stamp <= after + timedelta(seconds=1)


def test_auto_is_json_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("auto", "info", stream=stream)
    get_logger().info("daemon_started")
    assert json_lines(stream)[0]["event"] == "daemon_started"


def test_auto_is_console_on_a_terminal() -> None:
    stream = FakeTerminal()
    configure_logging("auto", "info", stream=stream)
    get_logger(vm="web-1").info("vm_created", vcpus=2)
    text = stream.getvalue()
    assert not text.startswith("{")
    assert "vm_created" in text and "vcpus" in text and "web-1" in text


def test_console_without_a_terminal_has_no_colour_codes() -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream=stream)
    get_logger().info("vm_created", vcpus=2)
    text = stream.getvalue()
    assert "\x1b[" not in text
    assert re.search(r"\[info\s*\] vm_created\s+vcpus=2", text)


def test_json_on_a_terminal_when_asked() -> None:
    stream = FakeTerminal()
    configure_logging("json", "info", stream=stream)
    get_logger().info("x_happened")
    assert json_lines(stream)[0]["event"] == "x_happened"


def test_level_filters_and_reconfiguring_reaches_loggers_already_held() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    log = get_logger(component="peer").bind(peer="p1")  # bound before the reconfiguration
    log.debug("hidden_debug")
    log.info("shown_info")
    configure_logging("json", "debug", stream=stream)  # what SIGHUP does
    log.debug("shown_debug")
    configure_logging("json", "error", stream=stream)
    log.warning("hidden_warning")
    log.error("shown_error")
    events = [(line["event"], line["peer"]) for line in json_lines(stream)]
    assert events == [("shown_info", "p1"), ("shown_debug", "p1"), ("shown_error", "p1")]


def test_exception_is_one_line_with_the_traceback() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        get_logger(vm="v").exception("vcpu_thread_failed")
    (line,) = json_lines(stream)
    assert (line["event"], line["level"], line["vm"]) == ("vcpu_thread_failed", "error", "v")
    assert "ZeroDivisionError" in line["exception"]


def test_values_json_cannot_encode_become_strings() -> None:
    from pathlib import Path

    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    get_logger().info("state_dir_opened", path=Path("/var/lib/migrated"), raw=b"\x00")
    (line,) = json_lines(stream)
    assert line["path"] == "/var/lib/migrated"
    assert line["raw"] == "b'\\x00'"


def test_standard_logging_lands_in_the_same_stream() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    logging.getLogger("trio.something").warning("a %s happened", "thing")
    logging.getLogger("chatty").debug("dropped below the level")
    (line,) = json_lines(stream)
    assert line["event"] == "library_log"
    assert (line["level"], line["logger"]) == ("warning", "trio.something")
    assert line["message"] == "a thing happened"


def test_threads_never_interleave_lines() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)

    def spam(n: int) -> None:
        log = get_logger(vcpu=n)
        for i in range(200):
            log.info("vcpu_exit", reason="io", count=i, pad="x" * 200)

    threads = [threading.Thread(target=spam, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = json_lines(stream)
    assert len(lines) == 8 * 200
    assert {line["vcpu"] for line in lines} == set(range(8))


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "verbose")])
def test_bad_arguments(fmt: str, level: str) -> None:
    with pytest.raises(ValueError, match="allowed are"):
        configure_logging(fmt, level)


def test_default_stream_is_stderr_at_write_time(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    get_logger().info("to_stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["event"] == "to_stderr"


def test_a_broken_stream_is_not_fatal() -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    configure_logging("json", "info", stream=Broken())
    get_logger().info("nobody_reads_this")
    closed = io.StringIO()
    configure_logging("json", "info", stream=closed)
    closed.close()
    get_logger().info("nobody_reads_this_either")
