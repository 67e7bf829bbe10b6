"""The parts of bench/vs_qemu.py that decide its verdicts, without QEMU: the memory check it
applies to QEMU's target (a target that is consistent but behind its source must fail), the
daemon settings it passes through (they must reach migrated's own config parser), and its figures.

Running QEMU itself is the benchmark's job (CI has no QEMU); `--help` is covered by
test_bench_scripts.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import qemu_vm  # noqa: E402
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


def figure(median: float) -> dict[str, object]:
    """A spread() result whose runs all had `median`."""
    return {"median": median, "range": [median, median]}


def bulk_result(qemu: float, migrated: float, **extra: object) -> dict[str, object]:
    """A bulk section of vs_qemu's JSON, iperf3 at 3000 MiB/s."""
    return {
        "guest_mib": 2048,
        "iperf3_one_stream_mib_s": {"runs": [3000.0], **figure(3000.0)},
        "qemu": {"runs": [{"mib_s": qemu}], "mib_s": figure(qemu)},
        "migrated": {"runs": [{"mib_s": migrated}], "mib_s": figure(migrated), "bulk_phase_mib_s": figure(1250.0)},
        **extra,
    }


def test_the_crypto_share_and_its_table_rows() -> None:
    bulk = bulk_result(
        500.0, 1200.0, migrated_clear_not_production={"runs": [{"mib_s": 1500.0}], "mib_s": figure(1500.0)}
    )
    share = vs_qemu.crypto_share(bulk)
    assert share == {"slowdown_percent": 20.0, "share_of_gap_to_iperf3_percent": round(100 * 300 / 1800, 1)}
    bulk["crypto_share"] = share
    table = vs_qemu.markdown({"bulk": bulk})
    assert "stream protection OFF (test-only, not a production mode) | 1500 (1500-1500) | 1500.0 |" in table
    assert "slows the copy 20.0%" in table


def test_qemu_over_tls_is_judged_as_a_second_reference_and_gets_its_table_row() -> None:
    bulk = bulk_result(700.0, 1200.0, qemu_tls={"runs": [{"mib_s": 400.0}], "mib_s": figure(400.0)})

    def line(engine: str, total: float, downtime: float) -> dict[str, object]:
        summary = {
            "total_ms": figure(total),
            "downtime_ms": figure(downtime),
            "downtime_to_target_loaded_ms": figure(downtime),
        }
        return {"engine": engine, "limit_ms": 300, "runs": [], "summary": summary}

    lines = {
        "q300": line("qemu", 20.0, 2.0),
        "m300off": line("migrated", 25.0, 3.0),
        "qtls300": line("qemu", 30.0, 8.0),
    }
    targets = vs_qemu.evaluate({"bulk": bulk, "boot_sector": {"lines": lines}}, [300])
    assert targets["bulk_at_least_2x_qemu"]["pass"] is False  # 1200 < 1400
    assert targets["bulk_at_least_2x_qemu_over_tls"] == {"pass": True, "migrated": 1200.0, "qemu_tls": 400.0}
    assert targets["boot_300ms_total_le_qemu"]["pass"] is False
    assert targets["boot_300ms_total_le_qemu_over_tls"] == {"pass": True, "migrated": 25.0, "qemu": 30.0}
    assert targets["boot_300ms_downtime_le_half_qemu_over_tls"]["pass"] is True  # 3 <= 8 / 2
    assert targets["boot_300ms_downtime_le_half_qemu"]["pass"] is False
    table = vs_qemu.markdown({"bulk": bulk})
    assert "| QEMU over TLS (x509: the same protection as migrated's) | 400 (400-400) | 400.0 |" in table


def test_the_tls_certificates_are_what_qemu_reads_and_verify_for_both_ends(tmp_path: Path) -> None:
    """openssl itself checks the chain and the address QEMU's client names (tls-hostname)."""
    directory = qemu_vm.tls_certificates(tmp_path / "tls")
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"):
        assert (directory / name).is_file(), name
    for end in ("server", "client"):
        done = subprocess.run(
            ["openssl", "verify", "-CAfile", "ca-cert.pem", "-verify_ip", qemu_vm.TLS_HOSTNAME, f"{end}-cert.pem"],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    args = qemu_vm.tls_args(directory)
    assert f"tls-creds-x509,id={qemu_vm.TLS_SERVER},dir={directory},endpoint=server,verify-peer=on" in args
    assert f"tls-creds-x509,id={qemu_vm.TLS_CLIENT},dir={directory},endpoint=client" in args


def test_bulk_runs_into_reserved_ram_are_reported_apart_and_marked() -> None:
    """The RAM reserve's bulk line: its own row, each run marked fresh or reserve, its median from
    the reserve's runs only; the targets stay judged on the fresh-target line."""
    reserve_runs = [{"mib_s": 900.0, "ram_from_reserve": False}, {"mib_s": 2000.0, "ram_from_reserve": True}]
    bulk = bulk_result(
        700.0,
        1200.0,
        migrated_ram_reserve={"runs": reserve_runs, "from_reserve": "1/2", "mib_s": figure(2000.0)},
    )
    table = vs_qemu.markdown({"bulk": bulk})
    assert (
        "| migrated, target RAM from its reserve (1/2 runs; not the fresh-target figure) | 2000 (2000-2000) | "
        "900.0 (fresh), 2000.0 (reserve) |" in table
    )
    assert vs_qemu.evaluate({"bulk": bulk}, [300])["bulk_at_least_2x_qemu"] == {
        "pass": False,
        "migrated": 1200.0,
        "qemu": 700.0,
    }


def test_a_boot_sector_line_counts_the_runs_whose_target_ram_came_from_the_reserve() -> None:
    memory = {"ok": True}
    runs = [
        {"completed": True, "total_ms": 30.0, "downtime_ms": 3.0, "memory": memory, "ram_from_reserve": flag}
        for flag in (False, True, True)
    ]
    line = {"engine": "migrated", "limit_ms": 300, "runs": runs}
    assert vs_qemu.summarize_line(line)["ram_from_reserve"] == "2/3"
    assert "ram_from_reserve" not in vs_qemu.summarize_line({**line, "engine": "qemu"})
