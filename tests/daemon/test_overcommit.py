"""migrated.overcommit: warn past the host's size, refuse past the configured factor."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrated.overcommit import Demand, HostSize, OvercommitRefused, check_overcommit, host_size

HOST = HostSize(memory_mib=24_000, cpus=2)


def check(new: Demand, *present: Demand, memory: float = 1.5, vcpus: float = 8) -> list[str]:
    return check_overcommit("web", new, present, HOST, memory, vcpus)


def test_within_the_host_says_nothing() -> None:
    assert check(Demand(12_000, 1), Demand(12_000, 1)) == []


def test_past_the_host_warns_with_the_numbers() -> None:
    (warning,) = check(Demand(1_024, 1), Demand(24_000, 1))
    assert warning.startswith("VM web: this daemon's VMs would have 25024 MiB, 1.04 times the host's 24000 MiB")
    assert "vm.max_memory_overcommit = 1.5" in warning
    (warning,) = check(Demand(64, 3))
    assert "3 vCPUs, 1.50 times the host's 2 CPUs" in warning and "vm.max_vcpu_overcommit = 8" in warning


def test_past_the_factor_is_refused_naming_the_key() -> None:
    with pytest.raises(OvercommitRefused) as memory:
        check(Demand(100_000, 1))
    assert "VM web" in str(memory.value) and "100000 MiB" in str(memory.value)
    assert "vm.max_memory_overcommit allows 1.5 times: refused" in str(memory.value)
    with pytest.raises(OvercommitRefused) as vcpus:
        check(Demand(64, 2), Demand(64, 15))
    assert "17 vCPUs, 8.50 times the host's 2 CPUs" in str(vcpus.value)
    assert "vm.max_vcpu_overcommit allows 8 times" in str(vcpus.value)


def test_exactly_at_the_factor_is_allowed() -> None:
    assert len(check(Demand(64, 16))) == 1  # 8.00 times: warned, not refused


def test_host_size_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683792 kB\nMemFree:  1 kB\n")
    size = host_size(meminfo)
    assert size.memory_mib == 24683792 // 1024 and size.cpus >= 1
    meminfo.write_text("MemFree:  1 kB\n")
    with pytest.raises(RuntimeError, match="no MemTotal"):
        host_size(meminfo)
