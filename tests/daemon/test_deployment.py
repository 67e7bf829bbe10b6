"""What the unit relies on, held on the host with real daemon processes: the harvester's
SCHED_FIFO with CAP_SYS_NICE as the only capability (the unit's CapabilityBoundingSet), the loud
warning without it, and daemon.control_socket_group for operators who are not root.

The unit's restrictions are reproduced with util-linux's setpriv (the capability bounding set)
and prlimit (RLIMIT_RTPRIO); systemd itself runs the unit in the systemd lane
(.ci/systemd/lane). RLIMIT_RTPRIO 1 without a capability (the unit's LimitRTPRIO=1) is not
tried here: raising the hard limit from 0 needs CAP_SYS_RESOURCE, which this machine's root
lacks. Needs root (to drop capabilities and switch users)
and /dev/kvm.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "migration"))
from daemons import REPO, DaemonProcess, wait_for  # noqa: E402

from migrated.config import ConfigError, load_config  # noqa: E402

pytestmark = pytest.mark.kvm

NOBODY = 65534
# Any group that exists on a Debian system and that nobody (65534) is not a member of.
OPERATORS = grp.getgrnam("users")
# Root without any capability, and root with only the unit's CapabilityBoundingSet=CAP_SYS_NICE.
NO_CAPABILITIES = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
UNIT_CAPABILITIES = ("setpriv", "--bounding-set=-all,+sys_nice", "--inh-caps=-all")
SMALL_VM = {"memory_mib": 64, "vcpus": 1, "working_set_mib": 8, "dirty_rate_mib_s": 10}


@pytest.fixture(autouse=True)
def preconditions() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests drop capabilities and switch users: run them as root")
    for tool in ("setpriv", "prlimit"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (util-linux)")
    if NOBODY in OPERATORS.gr_mem or os.getgrouplist("nobody", NOBODY).count(OPERATORS.gr_gid):
        pytest.fail(f"nobody is a member of {OPERATORS.gr_name}: pick another group for these tests")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.stop()


def make(
    tmp_path: Path,
    started: list[DaemonProcess],
    name: str,
    config: str = "",
    workdir: Path | None = None,
    **fields: object,
) -> DaemonProcess:
    """A daemon whose files (socket, log, state) lie in `workdir` (default: tmp_path)."""
    key = tmp_path / "peer.key"
    if not key.exists():
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
    config_path = tmp_path / f"{name}.toml"
    config_path.write_text(config)
    daemon = DaemonProcess(name, workdir or tmp_path, key, extra_args=("--config", str(config_path)), **fields)  # type: ignore[arg-type]
    started.append(daemon)
    return daemon


# --- the harvester's real-time priority ----------------------------------------------------


def test_the_units_capability_gives_the_harvester_sched_fifo(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """CAP_SYS_NICE and nothing else, RLIMIT_RTPRIO 0: the ring harvester still gets FIFO."""
    daemon = make(tmp_path, daemons, "rt", wrapper=("prlimit", "--rtprio=0", *UNIT_CAPABILITIES)).start()
    status = daemon.call("daemon.status")
    assert status["harvester_realtime"] is True, status
    assert status["harvester_realtime_error"] is None
    daemon.call("vm.create", name="web", dirty_tracking="ring", **SMALL_VM)
    shown = wait_for(
        lambda: (v := daemon.call("vm.show", name="web")["tracker"])["harvester_realtime"] is not None and v,
        what="the harvester to start",
    )
    assert shown["harvester_realtime"] is True, shown
    assert daemon.events("harvester_realtime_unavailable") == []
    # The same capability gives a migrating guest's vCPU threads their priority back (vcpupriority.py).
    assert status["vcpu_nice_restorable"] is True, status
    assert daemon.events("vcpu_nice_unavailable") == []
    # A root daemon keeps idle CPUs polling in its downtimes (cpulatency.py).
    assert status["downtime_idle_polling"] is True, status
    assert daemon.events("cpu_latency_unavailable") == []


def test_without_rtprio_the_daemon_says_loudly_what_it_costs(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    daemon = make(tmp_path, daemons, "nort", wrapper=("prlimit", "--rtprio=0", "--nice=0", *NO_CAPABILITIES)).start()
    status = daemon.call("daemon.status")
    assert status["harvester_realtime"] is False, status
    # Nor could a migrating guest's vCPU threads get their priority back: they are left alone.
    assert status["vcpu_nice_restorable"] is False, status
    (nice_warning,) = daemon.events("vcpu_nice_unavailable")
    assert "Permission denied" in str(nice_warning["error"]) and "CAP_SYS_NICE" in str(nice_warning["fix"])
    assert "Operation not permitted" in status["harvester_realtime_error"]
    (warning,) = daemon.events("harvester_realtime_unavailable")
    assert warning["level"] == "warning"
    assert "livelocks the vCPU" in str(warning["cost"])
    assert "CAP_SYS_NICE" in str(warning["fix"]) and "RestrictRealtime" in str(warning["fix"])
    # The harvester itself agrees with the probe.
    daemon.call("vm.create", name="web", dirty_tracking="ring", **SMALL_VM)
    shown = wait_for(
        lambda: (v := daemon.call("vm.show", name="web")["tracker"])["harvester_realtime"] is not None and v,
        what="the harvester to start",
    )
    assert shown["harvester_realtime"] is False, shown


# --- daemon.control_socket_group -----------------------------------------------------------


def migratectl_as_nobody(socket: Path, *groups: int) -> subprocess.CompletedProcess[str]:
    """`migratectl vm list` as user nobody with the given supplementary groups."""
    ids = ("--reuid", str(NOBODY), "--regid", str(NOBODY))
    group_args = ("--groups", ",".join(map(str, groups))) if groups else ("--clear-groups",)
    command = ["setpriv", *ids, *group_args, sys.executable, "-m", "migrated.cli", "--socket", str(socket)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*command, "vm", "list"], capture_output=True, text=True, env=env, timeout=60, cwd="/")


def open_up(path: Path) -> None:
    """tmp_path's parents are 0700 root: let nobody walk to the runtime directory."""
    for parent in [path, *path.parents]:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o001)


def test_group_members_use_the_socket_and_others_are_refused(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    open_up(tmp_path)
    daemon = make(
        tmp_path,
        daemons,
        "ops",
        f'[daemon]\ncontrol_socket_group = "{OPERATORS.gr_name}"\n',
        workdir=runtime,
        # The daemon is a member of the group (SupplementaryGroups=) and holds no capability.
        wrapper=(*NO_CAPABILITIES, "--groups", str(OPERATORS.gr_gid)),
        environ={"RUNTIME_DIRECTORY": str(runtime)},
    )
    daemon.start()
    assert daemon.socket.parent == runtime

    sock = daemon.socket.stat()
    assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == OPERATORS.gr_gid
    directory = runtime.stat()
    assert stat.S_IMODE(directory.st_mode) == 0o750 and directory.st_gid == OPERATORS.gr_gid

    member = migratectl_as_nobody(daemon.socket, OPERATORS.gr_gid)
    assert member.returncode == 0, member.stderr
    stranger = migratectl_as_nobody(daemon.socket)
    assert stranger.returncode != 0
    assert "permission" in stranger.stderr.lower() and "control_socket_group" in stranger.stderr, stranger.stderr
    assert "Traceback" not in stranger.stderr


def test_without_the_option_the_socket_is_root_only(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    daemon = make(tmp_path, daemons, "plain").start()
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    open_up(tmp_path)
    refused = migratectl_as_nobody(daemon.socket, OPERATORS.gr_gid)
    assert refused.returncode != 0 and "permission" in refused.stderr.lower(), refused.stderr


def test_a_group_the_daemon_cannot_give_stops_the_start_with_the_fix(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """No CAP_CHOWN and not a member: chown(2) fails; the error says which line the unit lacks."""
    daemon = make(
        tmp_path,
        daemons,
        "notmember",
        f'[daemon]\ncontrol_socket_group = "{OPERATORS.gr_name}"\n',
        wrapper=NO_CAPABILITIES,
    )
    with pytest.raises(RuntimeError, match="did not start"):
        daemon.start(timeout=20)
    # 2: a configuration error, which the unit does not restart (RestartPreventExitStatus=2).
    assert daemon.process is not None and daemon.process.wait(timeout=20) == 2
    log = daemon.log()
    assert f"SupplementaryGroups={OPERATORS.gr_name}" in log and str(daemon.socket) in log, log
    assert "Traceback" not in log
    assert not daemon.socket.exists()


def test_an_unknown_group_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        '[daemon]\ncontrol_socket_group = "no-such-group-h13s"\n[peer]\nauth = "none"\nallow_unauthenticated = true\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "daemon.control_socket_group"
    assert "no-such-group-h13s" in str(caught.value) and str(path) in str(caught.value)
