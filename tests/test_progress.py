"""migrated.progress: the progress line and the summary migratectl prints (pure formatting)."""

from __future__ import annotations

import io
import time
from typing import Any

from migrated.progress import ProgressPrinter, format_summary, progress_parts

MIB = 1 << 20


def stats(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "state": "bulk",
        "role": "source",
        "peer": "10.0.0.2:7890",
        "migration_id": "m-1",
        "round": 0,
        "bytes_sent": 64 * MIB,
        "pages_sent": 16384,
        "zero_pages": 0,
        "pages_remaining": 16384,
        "bandwidth_mib_s": 104.34490231803395,
        "dirty_rate_mib_s": 8.0,
        "predicted_downtime_ms": None,
        "started_at": time.time() - 2.0,
    }
    return {**base, **changes}


def test_progress_line_has_percent_total_rates_elapsed_and_eta() -> None:
    moving, clock = progress_parts(stats(pages_remaining=49152), 256 * MIB)
    assert moving.startswith("bulk") and " 25%" in moving, moving
    assert "sent 64.0 MiB/256.0 MiB" in moving and "remaining 49152 pages" in moving, moving
    assert "bw 104.3 MiB/s" in moving and "predicted downtime -" in moving, moving
    assert clock.startswith("elapsed 2.") and "ETA 1.8 s" in clock, clock  # 192 MiB at 104.3 MiB/s


def test_bulk_percent_counts_only_the_pages_it_will_send() -> None:
    """A sparse guest: 256 MiB of RAM of which 64 MiB was ever written; half of that is sent."""
    moving, _ = progress_parts(stats(pages_sent=4096, zero_pages=4096, pages_remaining=8192), 256 * MIB)
    assert " 50%" in moving, moving
    moving, _ = progress_parts(stats(pages_sent=16384, zero_pages=0, pages_remaining=0), 256 * MIB)
    assert "100%" in moving, moving


def test_rounds_percent_counts_what_is_left_dirty() -> None:
    moving, _ = progress_parts(stats(state="rounds", round=3, pages_remaining=6553), 256 * MIB)
    assert " 90%" in moving and "round 3" in moving, moving


def test_the_target_says_received_and_no_source_figures() -> None:
    moving, clock = progress_parts(stats(role="target", state="receiving"), None)
    assert "received 64.0 MiB" in moving and "bw" not in moving and "remaining" not in moving, moving
    assert "ETA" not in clock


def test_without_a_terminal_a_line_only_when_something_moved() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=False)
    printer.show(stats(started_at=time.time() - 1), None)
    printer.show(stats(started_at=time.time() - 2), None)  # only the clock moved
    printer.show(stats(bytes_sent=96 * MIB), None)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "sent 64.0 MiB" in lines[0] and "sent 96.0 MiB" in lines[1]


def test_on_a_terminal_one_line_rewritten_and_cut_to_the_width() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=True, width=60)
    printer.show(stats(), None)
    printer.show(stats(bytes_sent=96 * MIB), None)
    printer.end()
    text = out.getvalue()
    assert "\n" not in text[:-1] and text.endswith("\n"), repr(text)
    frames = text[:-1].split("\r")[1:]
    assert len(frames) == 2
    for frame in frames:
        assert frame.endswith("\x1b[K") and len(frame) - len("\x1b[K") <= 59, repr(frame)


def test_summary_rounds_and_names_units() -> None:
    summary = format_summary(
        stats(
            state="completed",
            total_ms=4520.512345,
            setup_ms=12.3456,
            downtime_ms=312.77,
            guest_downtime_ms=311.04,
            downtime_limit_ms=300.0,
            rounds=2,
            backup_bitmap="not in use: this kernel does not advertise WITH_BITMAP ... (R7)",
            dirty_tracking="ring",
        )
    )
    assert "state: completed" in summary
    assert "total_ms: 4520.5" in summary and "setup_ms: 12.3" in summary
    assert "downtime_ms: 312.8 (limit 300) (over the limit)" in summary
    assert "guest_downtime_ms: 311.0\n" in summary
    assert "bandwidth_mib_s: 104.3\n" in summary and "104.34" not in summary
    assert "bytes_sent: 64.0 MiB (16384 pages with data, 0 zero pages)" in summary
    assert "backup_bitmap: not in use (R7, docs/design.md)" in summary
    assert "role: source (to 10.0.0.2:7890)" in summary


def test_summary_on_the_target() -> None:
    summary = format_summary(stats(state="completed", role="target", peer="10.0.0.1:50000"))
    assert "role: target (from 10.0.0.1:50000)" in summary and "bytes_received: 64.0 MiB" in summary
    assert "bandwidth_mib_s" not in summary and "total_ms" not in summary


def test_summary_names_the_limited_vcpus_and_what_they_were_held_to() -> None:
    limits = [{"vcpu": 0, "limit_mib_s": 8.44, "dirty_rate_mib_s": 21.7, "throttle_percent": 62.7}]
    summary = format_summary(stats(state="completed", dirty_limits=limits, dirty_limited_vcpus=[0]))
    assert "dirty_limits: vCPU 0 at 8.4 MiB/s (62.7% held)" in summary
    # Limited earlier, free by the end: still named.
    summary = format_summary(stats(state="completed", dirty_limits=[], dirty_limited_vcpus=[0, 2]))
    assert "dirty_limits: none in force at the end (limited: vCPU 0, 2)" in summary
    assert "dirty_limits" not in format_summary(stats(state="completed"))
