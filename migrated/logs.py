"""Structured logging: events with short snake_case names and key-value fields, never prose.

    log = get_logger(vm="web-1")
    log.info("migration_started", peer="10.0.0.2:7890", migration_id=mid)

JSON lines when stderr is not a terminal (journald, log shippers), a readable console format on
a terminal. When stderr is journald's stream (`JOURNAL_STREAM` names its device and inode, as
systemd.exec(5) says to check), each line starts with its syslog priority, `<3>` error to `<7>`
debug (sd-daemon(3)), so journald files it under the right PRIORITY.

The processor chain is installed once and reads the level, format and stream from `_state` on
every event, so `configure_logging()` again on SIGHUP changes loggers that modules already hold (structlog would otherwise keep the configuration each logger was built with).
Libraries that log through the standard `logging` module end up in the same stream and format.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from .events import BUS

__all__ = ["configure_logging", "get_logger", "is_journal_stream"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# syslog(3) priorities: LOG_CRIT 2, LOG_ERR 3, LOG_WARNING 4, LOG_INFO 6, LOG_DEBUG 7.
SYSLOG_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


class _State:
    level = LEVELS["info"]
    json = False
    colors = False
    journal = False  # prefix each line with its syslog priority (stderr is journald's stream)
    stream: TextIO | None = None  # None: whatever sys.stderr is at the time of writing


_state = _State()
_write_lock = threading.Lock()  # vCPU and harvester threads log too: one line at a time
_installed = False

_timestamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
_format_exc = structlog.processors.format_exc_info
_json = structlog.processors.JSONRenderer(serializer=json.dumps, default=str)
_console = {colors: structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False) for colors in (False, True)}


def _drop_below_level(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    if LEVELS.get(event.get("level", "info"), 20) < _state.level:
        raise structlog.DropEvent
    return event


def _publish(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """The same records that go to the log, to the event stream's subscribers (if any)."""
    if len(BUS):
        BUS.publish({k: v for k, v in event.items() if k not in ("exc_info", "stack_info")})
    return event


def _render(logger: WrappedLogger, method: str, event: EventDict) -> str:
    prefix = f"<{SYSLOG_PRIORITIES.get(event.get('level', 'info'), 6)}>" if _state.journal else ""
    if _state.json:
        rendered = _json(logger, method, _format_exc(logger, method, event))
        assert isinstance(rendered, str)  # json.dumps renders str (orjson would give bytes)
        return prefix + rendered
    # journald reads each line as its own entry: a multi-line console event (a traceback) keeps
    # its priority on every line.
    lines = _console[_state.colors](logger, method, event).split("\n")
    return "\n".join(prefix + line for line in lines)


def is_journal_stream(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True if `stream` is the journald stream systemd connected (JOURNAL_STREAM is "DEV:INODE").

    A child that inherited JOURNAL_STREAM but writes to a redirected stderr must not prefix.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # not a real file (tests), or closed
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class _StreamLogger:
    """The end of the chain: writes each rendered line to the current stream, whole."""

    def msg(self, line: str) -> None:
        stream = _state.stream or sys.stderr
        with _write_lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):
                # A closed or broken stderr (journald restarted) must not kill the caller, a
                # vCPU thread or the event loop; there is nowhere left to report it.
                pass

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _ToStructlog(logging.Handler):
    """Routes the standard `logging` module (trio, libraries) into our stream, as events."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Custom levels (5, 25, ...) map to the standard level at or below them.
            name = next((n for n, v in reversed(LEVELS.items()) if record.levelno >= v), "debug")
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            getattr(get_logger(), name)("library_log", **fields)
        except Exception:
            self.handleError(record)


def _install() -> None:
    global _installed
    if _installed:
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _drop_below_level,
            _timestamp,
            _publish,
            structlog.processors.StackInfoRenderer(),
            _render,
        ],
        # Everything passes this wrapper; `_drop_below_level` filters by the current level.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=lambda *args: _StreamLogger(),
        # Not cached, so that structlog.testing.capture_logs() sees every logger in tests.
        cache_logger_on_first_use=False,
    )
    logging.getLogger().addHandler(_ToStructlog())
    _installed = True


def configure_logging(format: str = "auto", level: str = "info", *, stream: TextIO | None = None) -> None:
    """Set format ("auto", "json", "console") and level; call at start-up and again on SIGHUP.

    "auto" means JSON unless `stream` (default: stderr, looked up at each write) is a terminal.
    """
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: allowed are {', '.join(LEVELS)}")
    if format not in ("auto", "json", "console"):
        raise ValueError(f"log format {format!r}: allowed are auto, json, console")
    _install()
    target = stream or sys.stderr
    try:
        tty = target.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        tty = False
    _state.stream = stream
    _state.level = LEVELS[level]
    _state.json = format == "json" or (format == "auto" and not tty)
    _state.colors = tty and format != "json"
    _state.journal = is_journal_stream(target)
    # Stdlib records below our level would be dropped anyway: skip building them.
    logging.getLogger().setLevel(LEVELS[level])


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """A logger with `bound` fields in every event (e.g. vm=..., migration_id=..., peer=...)."""
    _install()
    logger: FilteringBoundLogger = structlog.get_logger(**bound)
    return logger
