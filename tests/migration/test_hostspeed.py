"""The host's speed as the sends show it (hostspeed.py): what the prediction's slowdown reads."""

from __future__ import annotations

import pytest

from migrated.migration.hostspeed import GIB, MIN_SAMPLE_BYTES, HostSpeed


def test_a_send_of_a_few_pages_is_not_a_sample_of_the_host() -> None:
    speed = HostSpeed()
    speed.add(15 * 4096, 0.0107)  # a sparse guest's whole bulk copy, beside a CPU hog
    assert speed.now_ms_per_gib == 0.0, "latency, not speed: no sample, no slowdown"
    speed.add(MIN_SAMPLE_BYTES, 0.001)
    assert speed.now_ms_per_gib == pytest.approx(1.0 * GIB / MIN_SAMPLE_BYTES)


def test_the_slowest_of_few_samples_then_the_median() -> None:
    speed = HostSpeed()
    speed.add(GIB, 0.5)
    speed.add(GIB, 2.0)
    assert speed.now_ms_per_gib == pytest.approx(2000.0), "one fast send must not hide a slow host"
    speed.add(GIB, 1.0)
    assert speed.now_ms_per_gib == pytest.approx(1000.0)
