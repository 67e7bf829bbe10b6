"""How migratectl shows a migration: the progress line while it runs, the summary after.

Human output rounds (one decimal for ms and MiB/s, MiB for bytes) and names its units; `--json`
keeps the daemon's full precision. Pure formatting: the caller fetches the stats and prints.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

PAGE_SIZE = 4096
MIB = 1 << 20

FINAL_STATES = ("completed", "completed-by-operator", "failed", "aborted", "cancelled", "in-doubt")
# What a side does while the migration runs, by its role.
_MOVING = {"source": "sent", "target": "received"}


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:.1f} MiB"


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def elapsed_s(stats: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds since the migration started: the daemon's own figure where it gives one."""
    if stats.get("elapsed_ms") is not None:
        return float(stats["elapsed_ms"]) / 1e3
    started = stats.get("started_at")
    if not isinstance(started, (int, float)):
        return None
    return max(0.0, (time.time() if now is None else now) - started)


def progress_parts(stats: dict[str, Any], memory_bytes: int | None) -> tuple[str, str]:
    """(what changes only when the migration moves, the clock part: elapsed and ETA)."""
    role = stats.get("role", "source")
    moved = _MOVING.get(role, "sent")
    sent = float(stats.get("bytes_sent", 0))
    remaining = int(stats.get("pages_remaining", 0))
    bandwidth = float(stats.get("bandwidth_mib_s", 0.0))
    words = [f"{stats['state']:<9}"]
    total_pages = memory_bytes // PAGE_SIZE if memory_bytes else 0
    if total_pages:
        done = int(stats.get("pages_sent", 0)) + int(stats.get("zero_pages", 0))
        to_move = total_pages
        if stats["state"] == "rounds":
            done = total_pages - remaining
        elif role == "source" and done + remaining:
            # The bulk copy moves only the pages the guest ever wrote: holes in its RAM file are
            # never sent, so a sparse guest would otherwise end its bulk copy at, say, 54%.
            to_move = done + remaining
        words.append(f"{min(100, 100 * done // to_move):3d}%")
    words.append(f"round {stats.get('round', 0)}")
    total = f"/{_mib(memory_bytes)}" if memory_bytes else ""
    words.append(f"{moved} {_mib(sent)}{total}")
    if role == "source":
        words.append(f"remaining {remaining} pages")
        words.append(f"bw {bandwidth:.1f} MiB/s")
        words.append(f"dirty {float(stats.get('dirty_rate_mib_s', 0.0)):.1f} MiB/s")
        predicted = stats.get("predicted_downtime_ms")
        words.append("predicted downtime " + ("-" if predicted is None else f"{float(predicted):.1f} ms"))
    clock = []
    elapsed = elapsed_s(stats)
    if elapsed is not None:
        clock.append(f"elapsed {_seconds(elapsed)}")
    if role == "source" and bandwidth > 0 and stats["state"] in ("bulk", "rounds"):
        clock.append(f"ETA {_seconds(remaining * PAGE_SIZE / (bandwidth * MIB))}")
    return "  ".join(words), "  ".join(clock)


class ProgressPrinter:
    """On a terminal: one line, rewritten in place and cut to the terminal's width. Elsewhere
    (a log, a pipe): a plain line each time something other than the clock changed."""

    def __init__(self, out: TextIO, tty: bool, width: int = 0) -> None:
        self._out = out
        self._tty = tty
        self._width = width
        self._last = ""
        self._drawn = False

    def show(self, stats: dict[str, Any], memory_bytes: int | None) -> None:
        moving, clock = progress_parts(stats, memory_bytes)
        line = f"{moving}  {clock}" if clock else moving
        if self._tty:
            if self._width:
                line = line[: self._width - 1]
            # \r back to the start, \x1b[K clears what a longer line left behind.
            self._out.write(f"\r{line}\x1b[K")
            self._drawn = True
        elif moving != self._last:
            self._out.write(line + "\n")
        self._last = moving
        self._out.flush()

    def end(self) -> None:
        """Leave the line in place on a terminal, so what follows starts on its own line."""
        if self._tty and self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


def format_summary(stats: dict[str, Any]) -> str:
    """The outcome, rounded, one fact per line (`key: value`, as `--json` names them)."""
    lines = [f"state: {stats['state']}"]

    def add(key: str, text: str | None) -> None:
        if text is not None:
            lines.append(f"{key}: {text}")

    def ms(key: str) -> str | None:
        value = stats.get(key)
        return None if value is None else f"{float(value):.1f}"

    add("migration_id", stats.get("migration_id"))
    add("role", f"{stats.get('role')} ({'to' if stats.get('role') == 'source' else 'from'} {stats.get('peer')})")
    add("total_ms", ms("total_ms"))
    add("setup_ms", ms("setup_ms"))
    downtime = ms("downtime_ms")
    limit = stats.get("downtime_limit_ms")
    if downtime is not None and limit:
        over = " (over the limit)" if float(stats["downtime_ms"]) > float(limit) else ""
        downtime = f"{downtime} (limit {float(limit):g}){over}"
    add("downtime_ms", downtime)
    add("guest_downtime_ms", ms("guest_downtime_ms"))
    add("verify_ms", ms("verify_ms"))
    moved = _MOVING.get(str(stats.get("role")), "sent")
    add(
        f"bytes_{moved}",
        f"{_mib(float(stats.get('bytes_sent', 0)))} ({stats.get('pages_sent', 0)} pages with data, "
        f"{stats.get('zero_pages', 0)} zero pages)",
    )
    add("rounds", str(stats.get("rounds", stats.get("round", 0))))
    if stats.get("role") == "source":
        add("bandwidth_mib_s", f"{float(stats.get('bandwidth_mib_s', 0.0)):.1f}")
        add("dirty_rate_mib_s", f"{float(stats.get('dirty_rate_mib_s', 0.0)):.1f}")
    if stats.get("throttle_percent"):
        add("throttle_percent", str(stats["throttle_percent"]))
    limits = stats.get("dirty_limits") or []
    if limits:
        held = ", ".join(
            f"vCPU {limit['vcpu']} at {float(limit['limit_mib_s']):.1f} MiB/s ({float(limit['throttle_percent']):g}% held)"
            for limit in limits
        )
        add("dirty_limits", held)
    elif stats.get("dirty_limited_vcpus"):
        add(
            "dirty_limits",
            f"none in force at the end (limited: vCPU {', '.join(map(str, stats['dirty_limited_vcpus']))})",
        )
    add("dirty_tracking", stats.get("dirty_tracking") or None)
    backup = str(stats.get("backup_bitmap") or "")
    if backup:
        # The daemon's sentence says why; the summary keeps its verdict and the rule to read.
        rule = "R6.4" if backup.startswith("used") else "R7"
        add("backup_bitmap", f"{backup.split(':')[0]} ({rule}, docs/design.md)")
    add("error", stats.get("error"))
    return "\n".join(lines)
