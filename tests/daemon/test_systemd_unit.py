"""systemd/migrated.service: `systemd-analyze verify` finds nothing; the unit keeps its rules."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from migrated.config import _SCHEMA

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "migrated.service"
INSTALLED_EXEC = "/usr/local/bin/migrated"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: install systemd (apt-get install systemd)")
    return found


def daemon_executable() -> str:
    """The test environment's `migrated` entry point if installed, else this Python."""
    script = Path(sys.executable).parent / "migrated"
    return str(script) if os.access(script, os.X_OK) else sys.executable


def verify(text: str, directory: Path) -> list[str]:
    """Runs `systemd-analyze verify`; returns its complaints about this unit (none expected)."""
    unit = directory / "migrated.service"
    # verify checks that ExecStart's binary exists; point it at one that does here.
    text = text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={daemon_executable()} ")
    unit.write_text(text)
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # Most complaints (unknown keys, unparsable values) leave the exit status at 0: read them.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "migrated.service" in line]
    if result.returncode != 0:
        complaints.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return complaints


def service_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#") and section == "Service":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def seconds(value: str) -> float:
    units = {"s": 1, "sec": 1, "min": 60, "h": 3600, "": 1}
    match = re.fullmatch(r"(\d+)\s*([a-z]*)", value)
    assert match and match[2] in units, f"cannot read the time span {value!r}"
    return int(match[1]) * units[match[2]]


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == []


def test_the_check_sees_a_broken_unit(tmp_path: Path) -> None:
    """The test above passes only because the unit is clean, not because nothing is read."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixed\nKillModus=mixed")
    complaints = verify(broken, tmp_path)
    assert any("KillModus" in line for line in complaints), complaints


def test_notify_watchdog_reload_and_stop() -> None:
    s = service_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [f"{INSTALLED_EXEC} --config /etc/migrated/migrated.toml"]
    assert s["ExecReload"] == ["""/bin/sh -c 'kill -HUP "$MAINPID"'"""]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["on-failure"]
    assert s["KillMode"] == ["mixed"]
    assert s["KillSignal"] == ["SIGTERM"]


def test_stop_timeout_outlasts_a_hand_over() -> None:
    # Stopping may migrate the VMs away first: that must not be cut short by SIGKILL.
    timeout_s = _SCHEMA["migration"]["timeout_s"].default
    assert seconds(service_settings()["TimeoutStopSec"][0]) > timeout_s


def test_directories_match_the_config_defaults() -> None:
    s = service_settings()
    control_socket = Path(_SCHEMA["daemon"]["control_socket"].default)
    state_dir = Path(_SCHEMA["daemon"]["state_dir"].default)
    assert control_socket.parent == Path("/run") / s["RuntimeDirectory"][0]
    assert s["RuntimeDirectoryMode"] == ["0750"]
    assert state_dir == Path("/var/lib") / s["StateDirectory"][0]


def test_hardening_keeps_kvm_reachable() -> None:
    s = service_settings()
    assert s["DevicePolicy"] == ["closed"]
    assert s["DeviceAllow"] == ["/dev/kvm rw", "/dev/cpu_dma_latency w"]
    assert "PrivateDevices" not in s  # it would hide /dev/kvm
    # One capability: the ring harvester's SCHED_FIFO (tests/daemon/test_deployment.py).
    assert s["CapabilityBoundingSet"] == ["CAP_SYS_NICE"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["SystemCallArchitectures"] == ["native"]
    assert s["LimitNOFILE"] == ["65536"]


def test_the_ring_harvester_may_run_real_time() -> None:
    """RestrictRealtime=yes would refuse the harvester's SCHED_FIFO (issue 13)."""
    s = service_settings()
    assert s.get("RestrictRealtime", ["no"]) == ["no"]
    assert int(s["LimitRTPRIO"][0]) >= 1
    assert "CAP_SYS_NICE" in s["CapabilityBoundingSet"][0].split()
