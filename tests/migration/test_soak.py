"""The soak, reduced (issue 11 item 6; `make soak` runs 100): ping-pong migrations of one VM
bring each daemon back to exactly its fds and threads after every round trip, and four VMs
migrating at once in both directions each end on exactly one side with a sound guest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from soak import four_at_once, ping_pong, start_pair  # noqa: E402
from soakplot import write_svg  # noqa: E402

pytestmark = pytest.mark.kvm


def test_ping_pong_returns_to_the_baseline_and_four_migrate_at_once(tmp_path: Path) -> None:
    a, b = start_pair(tmp_path)
    try:
        pong = ping_pong(a, b, 10)
        both_ways = four_at_once(a, b)
    finally:
        a.stop()
        b.stop()
    assert len(pong["samples"]) == 10
    assert set(pong["baselines"]) == {"0", "1"}
    assert pong["drift"] == [], pong["drift"]  # exact: the same fds and threads after each trip
    assert pong["guest_problem"] is None, pong["guest_problem"]
    for name, result in both_ways.items():
        assert len(result["running_on"]) == 1, (name, result)
        expected_home = result["to"] if result["state"] == "completed" else result["from"]
        assert result["running_on"] == [expected_home], (name, result)
        assert result["guest_problem"] is None, (name, result)
    assert {r["from"] for r in both_ways.values()} == {"a", "b"}, "both directions at once"
    svg = tmp_path / "soak.svg"
    write_svg(svg, pong["samples"])
    assert svg.read_text().count("<polyline") == 12  # three panels; per daemon hosting and not
