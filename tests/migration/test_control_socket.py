"""The control socket of a real daemon (DESIGN section 6, migrated/control.py).

A Unix socket only its owner may use. Every bad request gets {"ok": false, "error": ...} whose
words name the problem; one bad request or connection never stops the daemon, and a VM created
before keeps running through all of it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import DaemonProcess, REPO, free_port, heartbeat, wait_for
from migrated.control import MAX_REQUEST_BYTES, RequestError, request

pytestmark = pytest.mark.kvm

KEEPER = "keeper"
SMALL_VM: dict[str, Any] = {"memory_mib": 64, "vcpus": 1, "working_set_mib": 8, "dirty_rate_mib_s": 10}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    workdir = tmp_path_factory.mktemp("control")
    key = workdir / "peer.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    process = DaemonProcess("c", workdir, key)
    try:
        process.start()
        process.call("vm.create", name=KEEPER, **SMALL_VM)
        wait_for(lambda: heartbeat(process, KEEPER) > 0, what="the keeper's first heartbeat")
        yield process
    finally:
        process.stop()


def assert_keeps_serving(daemon: DaemonProcess) -> None:
    """The daemon answers, and the VM created before runs on with no verification error."""
    assert daemon.alive(), daemon.log()[-4000:]
    assert daemon.call("daemon.status")["vms"] == 1
    assert [vm["name"] for vm in daemon.call("vm.list")] == [KEEPER]
    before = daemon.call("vm.show", name=KEEPER)
    assert before["state"] == "running", before
    wait_for(
        lambda: heartbeat(daemon, KEEPER) > before["guest"]["heartbeat_generation"] + 5,
        timeout=10,
        what="the keeper's heartbeat to rise",
    )
    after = daemon.call("vm.show", name=KEEPER)
    assert after["guest"]["verification_errors"] == 0, after
    assert after["error"] is None, after


def exchange(path: Path, data: bytes, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Send `data` as is (then EOF) while reading every answer line until the daemon closes.

    The daemon may close before it read all of `data` (a request too long): the writer's
    broken pipe is expected then, and what the daemon answered is still read."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))  # blocking: waits while the listen backlog is full
    sock.settimeout(timeout)

    def write() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    received = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            received += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.join(timeout)
        sock.close()
    answers = [json.loads(line) for line in received.splitlines()]
    assert all(isinstance(answer, dict) and "ok" in answer for answer in answers), answers
    return answers


def request_line(cmd: Any, args: Any = None, **extra: Any) -> bytes:
    message: dict[str, Any] = {"cmd": cmd, **extra}
    if args is not None:
        message["args"] = args
    return json.dumps(message).encode() + b"\n"


def refused(daemon: DaemonProcess, line: bytes, *words: str) -> str:
    """One request line gets one answer: ok false, its error holding every word."""
    answers = exchange(daemon.socket, line)
    assert len(answers) == 1, answers
    answer = answers[0]
    assert answer["ok"] is False, answer
    error = answer["error"]
    assert isinstance(error, str) and error, answer
    for word in words:
        assert word in error, (word, error)
    return error


# ---- the socket itself --------------------------------------------------------------------


def test_control_socket_is_a_socket_only_its_owner_may_use(daemon: DaemonProcess) -> None:
    info = os.stat(daemon.socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(stat.S_IMODE(info.st_mode))
    assert info.st_uid == os.getuid()


def test_second_daemon_on_the_same_socket_is_refused(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A live daemon's control socket is never taken over (nor unlinked) by another one."""
    key = tmp_path / "peer.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "migrated",
            "--control-socket",
            str(daemon.socket),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--state-dir",
            str(tmp_path / "state"),
            "--peer-key-file",
            str(key),
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        timeout=30,
    )
    assert second.returncode != 0, second
    assert b"in use by a running daemon" in second.stderr, second.stderr
    assert daemon.socket.exists()
    assert_keeps_serving(daemon)


# ---- requests that are not requests -------------------------------------------------------


MALFORMED = {
    "not JSON": (b"vm.list please\n", ["request is not JSON"]),
    "invalid UTF-8": (b'\xff\xfe{"cmd": "vm.list"}\n', ["request is not JSON"]),
    "half a JSON object": (b'{"cmd": "vm.list", "args": {\n', ["request is not JSON"]),
    "a JSON array": (b'["vm.list", {}]\n', ['JSON object with a string "cmd"']),
    "a JSON string": (b'"vm.list"\n', ['JSON object with a string "cmd"']),
    "JSON null": (b"null\n", ['JSON object with a string "cmd"']),
    "no cmd": (b'{"args": {"name": "keeper"}}\n', ['JSON object with a string "cmd"']),
    "a cmd that is a number": (b'{"cmd": 42}\n', ['JSON object with a string "cmd"']),
    "args that are a list": (request_line("vm.show", ["keeper"]), ['"args" must be a JSON object']),
    "args that are a string": (request_line("vm.show", "keeper"), ['"args" must be a JSON object']),
    "an empty line": (b"\n", ["request is not JSON"]),
    # Each of these three once ended the daemon and its VMs (issue 10): ValueError from int(),
    # RecursionError from the decoder.
    "a JSON integer of 5,000 digits": (b"1" * 5000 + b"\n", ["a number of more than 32 digits"]),
    "an argument of 5,000 digits": (
        b'{"cmd": "vm.show", "args": {"name": ' + b"7" * 5000 + b"}}\n",
        ["a number of more than 32 digits"],
    ),
    "100,000 nested [": (b"[" * 100_000 + b"\n", ["nested 100000 levels deep"]),
    "100,000 nested { in args": (
        b'{"cmd": "vm.show", "args": ' + b'{"a": ' * 100_000 + b"\n",
        ["levels deep, more than 32"],
    ),
    "an unknown top-level key": (b'{"cmd": "vm.list", "as": "root"}\n', ["unknown keys ['as']"]),
    "an unknown command": (
        request_line("vm.explode", {"name": "keeper"}),
        ["unknown command 'vm.explode'", "known:", "vm.create", "migrate"],
    ),
}


@pytest.mark.parametrize("label", MALFORMED)
def test_malformed_request_gets_an_error(daemon: DaemonProcess, label: str) -> None:
    line, words = MALFORMED[label]
    refused(daemon, line, *words)
    assert_keeps_serving(daemon)


# ---- bad arguments ------------------------------------------------------------------------


def create(**changes: Any) -> bytes:
    args = {"name": "newcomer", **SMALL_VM, **changes}
    return request_line("vm.create", {k: v for k, v in args.items() if v is not None})


BAD_ARGUMENTS = {
    "memory_mib 'lots'": (create(memory_mib="lots"), ["memory (MiB) 'lots'", "integer"]),
    "memory_mib true": (create(memory_mib=True), ["memory (MiB) True", "integer"]),
    "memory_mib 1.5": (create(memory_mib=1.5), ["memory (MiB) 1.5", "integer"]),
    "memory_mib 0": (create(memory_mib=0), ["memory (MiB) 0", "from 2"]),
    "memory_mib odd": (create(memory_mib=65), ["memory 65 MiB", "multiple of 2 MiB"]),
    "memory_mib over the bound": (create(memory_mib=1 << 40), ["memory (MiB) 1099511627776"]),
    "negative vcpus": (create(vcpus=-1), ["vCPUs -1", "an integer from 1 to"]),
    "0 vcpus": (create(vcpus=0), ["vCPUs 0", "an integer from 1 to"]),
    "5000 vcpus": (create(vcpus=5000), ["vCPUs 5000", "an integer from 1 to 64"]),
    "a name with a space": (create(name="my vm"), ["VM name 'my vm'"]),
    "a name with a slash": (create(name="../etc"), ["VM name '../etc'"]),
    "an empty name": (create(name=""), ["VM name ''"]),
    "a name of 65 characters": (create(name="v" * 65), ["VM name", "1-64 characters"]),
    "a name that is a number": (create(name=7), ["VM name 7"]),
    "no name": (create(name=None), ["VM spec", "name"]),
    "no memory": (create(memory_mib=None), ["VM spec", "memory_mib"]),
    "working set larger than memory": (
        create(working_set_mib=128),
        ["working set (MiB) 128", "an integer from 1 to 64"],
    ),
    "negative dirty rate": (create(dirty_rate_mib_s=-5), ["dirty rate -5"]),
    "dirty rate 'fast'": (create(dirty_rate_mib_s="fast"), ["dirty rate 'fast'"]),
    "dirty rate NaN": (
        b'{"cmd": "vm.create", "args": {"name": "newcomer", "memory_mib": 64, '
        b'"working_set_mib": 8, "dirty_rate_mib_s": NaN}}\n',
        ["dirty rate nan"],
    ),
    "memory Infinity": (
        b'{"cmd": "vm.create", "args": {"name": "newcomer", "memory_mib": Infinity}}\n',
        ["memory (MiB) inf"],
    ),
    "an unknown guest": (create(guest="windows"), ["guest 'windows'", "workload"]),
    "an unknown key": (create(colour="blue"), ["unknown keys ['colour']"]),
    "an unknown dirty tracking": (create(dirty_tracking="telepathy"), ["dirty tracking 'telepathy'"]),
    "the keeper's name": (create(name=KEEPER), ["a VM named 'keeper' already exists"]),
    "vm.show of an unknown VM": (request_line("vm.show", {"name": "ghost"}), ["no VM named 'ghost'"]),
    "vm.show without a name": (request_line("vm.show", {}), ['"name" (a string) is required']),
    "vm.show with a list for a name": (
        request_line("vm.show", {"name": ["keeper"]}),
        ['"name" (a string) is required'],
    ),
    "vm.stop of an unknown VM": (request_line("vm.stop", {"name": "ghost"}), ["no VM named 'ghost'"]),
    "vm.set rate 'fast'": (
        request_line("vm.set", {"name": KEEPER, "dirty_rate_mib_s": "fast"}),
        ["dirty_rate_mib_s 'fast'"],
    ),
    "vm.set rate -1": (request_line("vm.set", {"name": KEEPER, "dirty_rate_mib_s": -1}), ["dirty_rate_mib_s -1"]),
    "vm.set rate NaN": (
        b'{"cmd": "vm.set", "args": {"name": "keeper", "dirty_rate_mib_s": NaN}}\n',
        ["dirty rate nan"],
    ),
    "migrate an unknown VM": (request_line("migrate", {"name": "ghost", "to": "127.0.0.1:1"}), ["no VM named 'ghost'"]),
    "migrate to no port": (request_line("migrate", {"name": KEEPER, "to": "nowhere"}), ["'nowhere'", "HOST:PORT"]),
    "migrate to port 99999": (
        request_line("migrate", {"name": KEEPER, "to": "127.0.0.1:99999"}),
        ["'127.0.0.1:99999'", "port from 1 to 65535"],
    ),
    "migrate with a downtime limit 'fast'": (
        request_line("migrate", {"name": KEEPER, "to": "127.0.0.1:1", "downtime_limit_ms": "fast"}),
        ["downtime_limit_ms 'fast'", "a number from 1 to 60000"],
    ),
    "migrate with verify 'maybe'": (
        request_line("migrate", {"name": KEEPER, "to": "127.0.0.1:1", "verify": "maybe"}),
        ["verify 'maybe'", "full, off"],
    ),
    "migration.status of an unknown VM": (
        request_line("migration.status", {"name": "ghost"}),
        ["no migration of a VM named 'ghost'"],
    ),
}


@pytest.mark.parametrize("label", BAD_ARGUMENTS)
def test_bad_arguments_get_an_error_naming_them(daemon: DaemonProcess, label: str) -> None:
    line, words = BAD_ARGUMENTS[label]
    refused(daemon, line, *words)
    assert_keeps_serving(daemon)


def test_same_name_twice_is_refused_and_the_first_vm_runs_on(daemon: DaemonProcess) -> None:
    first = daemon.call("vm.create", name="twin", **SMALL_VM)
    try:
        wait_for(lambda: heartbeat(daemon, "twin") > 0, what="twin's first heartbeat")
        with pytest.raises(RequestError, match="a VM named 'twin' already exists on this daemon"):
            daemon.call("vm.create", name="twin", **{**SMALL_VM, "memory_mib": 128})
        names = [vm["name"] for vm in daemon.call("vm.list")]
        assert sorted(names) == [KEEPER, "twin"], names
        shown = daemon.call("vm.show", name="twin")
        assert shown["spec"] == first["spec"], "the refused create changed the first VM"
        assert shown["state"] == "running", shown
        generation = shown["guest"]["heartbeat_generation"]
        wait_for(lambda: heartbeat(daemon, "twin") > generation + 5, what="twin's heartbeat to rise")
        assert daemon.call("vm.show", name="twin")["guest"]["verification_errors"] == 0
    finally:
        daemon.call("vm.stop", name="twin")
    assert_keeps_serving(daemon)


# ---- connections: several requests, long requests ----------------------------------------


def test_bad_request_does_not_end_the_connection(daemon: DaemonProcess) -> None:
    """One connection, requests pipelined: each gets its answer, in order."""
    lines = [
        b"garbage\n",
        request_line("vm.show", {"name": KEEPER}),
        request_line("nope"),
        request_line("daemon.status"),
    ]
    answers = exchange(daemon.socket, b"".join(lines))
    assert [answer["ok"] for answer in answers] == [False, True, False, True], answers
    assert answers[1]["result"]["name"] == KEEPER
    assert "unknown command 'nope'" in answers[2]["error"]
    assert_keeps_serving(daemon)


def padded(size: int) -> bytes:
    """A valid daemon.status request of exactly `size` bytes, then its newline."""
    skeleton = request_line("daemon.status", {"pad": ""})
    line = request_line("daemon.status", {"pad": "x" * (size + 1 - len(skeleton))})
    assert len(line) == size + 1 and line.endswith(b"}\n")
    return line


@pytest.mark.parametrize("size", [2 * MAX_REQUEST_BYTES, 16 * MAX_REQUEST_BYTES], ids=["2 MiB", "16 MiB"])
def test_request_over_1_mib_is_refused(daemon: DaemonProcess, size: int) -> None:
    answers = exchange(daemon.socket, padded(size))
    assert len(answers) == 1, answers
    assert answers[0] == {"ok": False, "error": "request longer than 1 MiB"}
    assert_keeps_serving(daemon)


def test_request_without_newline_over_1_mib_is_refused(daemon: DaemonProcess) -> None:
    answers = exchange(daemon.socket, b"{" * (3 * MAX_REQUEST_BYTES))
    assert answers == [{"ok": False, "error": "request longer than 1 MiB"}]
    assert_keeps_serving(daemon)


@pytest.mark.parametrize("excess", [1, 100], ids=lambda n: f"1 MiB + {n} bytes")
def test_request_just_over_1_mib_is_refused(daemon: DaemonProcess, excess: int) -> None:
    """The bound is 1 MiB per request line, not 1 MiB plus whatever the last read brought."""
    answers = exchange(daemon.socket, padded(MAX_REQUEST_BYTES + excess))
    assert len(answers) == 1, answers
    assert answers[0] == {"ok": False, "error": "request longer than 1 MiB"}, (
        f"a request line of 1 MiB + {excess} bytes was served: {str(answers[0])[:200]}"
    )
    assert_keeps_serving(daemon)


def test_request_of_exactly_1_mib_is_served(daemon: DaemonProcess) -> None:
    answers = exchange(daemon.socket, padded(MAX_REQUEST_BYTES))
    assert len(answers) == 1 and answers[0]["ok"] is True, str(answers)[:300]
    assert answers[0]["result"]["vms"] == 1


def test_client_vanishing_mid_request(daemon: DaemonProcess) -> None:
    for partial in (b'{"cmd": "vm.cre', b"x" * 300000):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(daemon.socket))
        sock.sendall(partial)
        sock.close()
    assert_keeps_serving(daemon)


def test_many_idle_connections_do_not_block_others(daemon: DaemonProcess) -> None:
    idle = []
    try:
        for _ in range(64):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket))
            sock.sendall(b'{"cmd": ')  # and nothing more
            idle.append(sock)
        # Let the daemon accept the last of them (the listen backlog is 16): the next test is
        # about a full backlog; this one is about connections the daemon holds.
        time.sleep(0.2)
        assert_keeps_serving(daemon)
    finally:
        for sock in idle:
            sock.close()
    assert_keeps_serving(daemon)


def test_client_waits_while_the_backlog_is_full(daemon: DaemonProcess) -> None:
    """migrated.control.request (what migratectl uses) with its timeout waits for a daemon that
    is slow to accept; a full listen backlog (a burst of clients, a loop busy for a moment) is
    not an error. Here the daemon is stopped (SIGSTOP) while the backlog fills, and continued
    half a second after the request started."""
    assert daemon.process is not None
    pid = daemon.process.pid
    pending: list[socket.socket] = []
    status: Any = None
    os.kill(pid, signal.SIGSTOP)
    try:
        while len(pending) < 1024:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(daemon.socket))
            except BlockingIOError:
                sock.close()
                break
            pending.append(sock)
        resume = threading.Timer(0.5, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            status = request(daemon.socket, "daemon.status", timeout=10)
        finally:
            resume.join()
    finally:
        os.kill(pid, signal.SIGCONT)
        for sock in pending:
            sock.close()
    assert status is not None and status["vms"] == 1, status
    assert_keeps_serving(daemon)
