"""The parts of bench/vs_qemu.py that decide its verdicts, without QEMU: the memory check it
applies to QEMU's target (a target that is consistent but behind its source must fail), the
daemon settings it passes through (they must reach migrated's own config parser), and its figures.

Running QEMU itself is the benchmark's job (CI has no QEMU); `--help` is covered by
test_bench_scripts.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import vs_qemu  # noqa: E402

from migrated.config import load_config  # noqa: E402
from migrated.guests.x86_64.bootsector import PASSES_ADDR, BootSectorParams, expected_words  # noqa: E402

MIB = 1 << 20


def guest_ram(params: BootSectorParams, newer_words: int) -> np.ndarray:
    """A boot-sector guest's RAM in the middle of pass 1: `newer_words` written, the rest zero."""
    ram = np.zeros(2 * MIB, np.uint8)
    words = ram[params.base : params.end].view(np.uint32)
    words[:newer_words] = expected_words(params.base, newer_words, 1)
    return ram


def test_a_target_behind_its_source_fails_though_its_stamps_agree(tmp_path: Path) -> None:
    params = BootSectorParams(base=0x100000, bytes=MIB)
    source, target = tmp_path / "source.ram", tmp_path / "target.ram"
    guest_ram(params, 50_000).tofile(source)
    guest_ram(params, 40_000).tofile(target)  # the last pages never arrived: still consistent
    check = vs_qemu.check_qemu_ram(source, target, params)
    assert check["bad_words"] == 0, "precondition: the stamps alone cannot see it"
    assert not check["ok"]
    first = params.base + 40_000 * 4 // 4096 * 4096
    assert check["guest_pages_differing_from_source"] == (50_000 * 4 - 1) // 4096 - 40_000 * 4 // 4096 + 1
    assert check["pages_differing_from_source"][0] == hex(first)


def test_a_firmware_page_is_listed_but_a_pass_counter_page_fails(tmp_path: Path) -> None:
    params = BootSectorParams(base=0x100000, bytes=MIB)
    source, target = tmp_path / "source.ram", tmp_path / "target.ram"
    ram = guest_ram(params, 1000)
    ram.tofile(source)
    ram[0xE8C20] ^= 0xFF  # QEMU's firmware area, not the guest's
    ram.tofile(target)
    check = vs_qemu.check_qemu_ram(source, target, params)
    assert check["ok"] and check["pages_differing_from_source"] == ["0xe8000"]
    ram[PASSES_ADDR] ^= 1
    ram.tofile(target)
    assert not vs_qemu.check_qemu_ram(source, target, params)["ok"]


def test_daemon_settings_reach_the_daemons_config_parser(tmp_path: Path) -> None:
    path = vs_qemu.write_daemon_config(
        tmp_path / "d.toml",
        ["migration.max_batch_bytes=4194304", "daemon.log_level=debug", "vm.dirty_tracking='ring'"],
    )
    key = tmp_path / "peer.key"  # as the benchmark's daemons get it: --peer-key-file
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    config = load_config(path, {"peer_key_file": str(key)})
    assert config.migration.max_batch_bytes == 4194304
    assert config.daemon.log_level == "debug"
    assert config.vm.dirty_tracking == "ring"


@pytest.mark.parametrize("setting", ["max_batch_bytes=1", "migration.=1", "migration.x"])
def test_a_setting_without_section_key_and_value_is_refused(tmp_path: Path, setting: str) -> None:
    with pytest.raises(SystemExit, match="SECTION.KEY=VALUE"):
        vs_qemu.write_daemon_config(tmp_path / "d.toml", [setting])


def test_spread_is_median_and_range_of_what_exists() -> None:
    assert vs_qemu.spread([30.0, None, 10.0, 20.0]) == {"median": 20.0, "range": [10.0, 30.0], "n": 3}
    assert vs_qemu.spread([None]) == {"median": None, "range": None, "n": 0}


def test_the_clear_bulk_line_reaches_the_config_parser_as_unauthenticated(tmp_path: Path) -> None:
    path = vs_qemu.write_daemon_config(tmp_path / "d.toml", ["migration.streams=4", *vs_qemu.CLEAR_SETTINGS])
    key = tmp_path / "peer.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    config = load_config(path, {"peer_key_file": str(key)})
    assert config.peer.auth == "none" and config.peer.allow_unauthenticated
    assert config.migration.streams == 4


def test_the_crypto_share_and_its_table_rows() -> None:
    def figure(median: float) -> dict[str, object]:
        return {"median": median, "range": [median, median]}

    bulk = {
        "guest_mib": 2048,
        "iperf3_one_stream_mib_s": {"runs": [3000.0], **figure(3000.0)},
        "qemu": {"runs": [{"mib_s": 500.0}], "mib_s": figure(500.0)},
        "migrated": {"runs": [{"mib_s": 1200.0}], "mib_s": figure(1200.0), "bulk_phase_mib_s": figure(1250.0)},
        "migrated_clear_not_production": {"runs": [{"mib_s": 1500.0}], "mib_s": figure(1500.0)},
    }
    share = vs_qemu.crypto_share(bulk)
    assert share == {"slowdown_percent": 20.0, "share_of_gap_to_iperf3_percent": round(100 * 300 / 1800, 1)}
    bulk["crypto_share"] = share
    table = vs_qemu.markdown({"bulk": bulk})
    assert "stream protection OFF (test-only, not a production mode) | 1500 (1500-1500) | 1500.0 |" in table
    assert "slows the copy 20.0%" in table
