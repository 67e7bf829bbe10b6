"""migrated.sdnotify against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrated.sdnotify import Notifier

REPO = Path(__file__).resolve().parents[2]


class Receiver:
    """systemd's end: a bound datagram socket that also learns the sender's pid, as systemd does."""

    def __init__(self, address: str, bind_to: str | bytes) -> None:
        self.address = address  # as it would appear in NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(bind_to)
        self.sock.settimeout(5)

    def receive(self) -> tuple[bytes, int]:
        """One datagram and the sender's pid (SCM_CREDENTIALS, what NotifyAccess=main checks)."""
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid, _, _ = struct.unpack("iII", payload[:12])
        return data, pid

    def datagram(self) -> bytes:
        return self.receive()[0]

    def assert_empty(self) -> None:
        self.sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            self.sock.recv(4096)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = str(tmp_path / "notify.sock")
    r = Receiver(path, path)
    yield r
    r.sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"migrated-test-{uuid.uuid4().hex}"
    r = Receiver("@" + name, b"\0" + name.encode())
    yield r
    r.sock.close()


def notifier_for(receiver: Receiver, errors: list[OSError] | None = None) -> Notifier:
    sink = errors if errors is not None else []
    return Notifier.from_environ({"NOTIFY_SOCKET": receiver.address}, on_error=sink.append)


def test_ready_status_stopping_watchdog_exactly(receiver: Receiver) -> None:
    errors: list[OSError] = []
    notifier = notifier_for(receiver, errors)
    assert notifier.enabled
    notifier.ready()
    assert receiver.datagram() == b"READY=1"
    notifier.status("migrating web-1: round 3")
    assert receiver.datagram() == b"STATUS=migrating web-1: round 3"
    notifier.watchdog()
    assert receiver.datagram() == b"WATCHDOG=1"
    notifier.stopping()
    assert receiver.datagram() == b"STOPPING=1"
    receiver.assert_empty()
    assert errors == []
    notifier.close()


def test_status_is_one_line(receiver: Receiver) -> None:
    notifier = notifier_for(receiver)
    notifier.status("two\nlines")
    # A newline would start a new VAR=value assignment in the datagram.
    assert receiver.datagram() == b"STATUS=two lines"


def test_reloading_carries_the_monotonic_time(receiver: Receiver) -> None:
    notifier = notifier_for(receiver)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.datagram().split(b"\n")
    assert lines[0] == b"RELOADING=1"
    assert len(lines) == 2 and lines[1].startswith(b"MONOTONIC_USEC=")
    assert before <= int(lines[1].removeprefix(b"MONOTONIC_USEC=")) <= after


def test_abstract_namespace(abstract_receiver: Receiver) -> None:
    errors: list[OSError] = []
    notifier = notifier_for(abstract_receiver, errors)
    notifier.ready()
    notifier.watchdog()
    assert abstract_receiver.datagram() == b"READY=1"
    assert abstract_receiver.datagram() == b"WATCHDOG=1"
    assert errors == []


def test_sender_is_the_main_process(receiver: Receiver) -> None:
    """From the real environment of a child process, as under systemd; NotifyAccess=main checks
    the sender's pid, so the datagram must come from the process itself."""
    env = {**os.environ, "NOTIFY_SOCKET": receiver.address, "PYTHONPATH": str(REPO)}
    code = "from migrated.sdnotify import Notifier; Notifier.from_environ().ready()"
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    data, pid = receiver.receive()
    assert child.wait(timeout=30) == 0
    assert (data, pid) == (b"READY=1", child.pid)


def test_reads_os_environ_by_default(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    Notifier.from_environ().ready()
    assert receiver.datagram() == b"READY=1"


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    errors: list[OSError] = []
    for notifier in (Notifier.from_environ(on_error=errors.append), Notifier(""), Notifier(None)):
        assert not notifier.enabled
        notifier.ready()
        notifier.status("x")
        notifier.reloading()
        notifier.watchdog()
        notifier.stopping()
        notifier.close()
    assert errors == []


def test_errors_are_reported_not_raised(tmp_path: Path) -> None:
    errors: list[OSError] = []
    notifier = Notifier(str(tmp_path / "nobody-listens"), on_error=errors.append)
    notifier.ready()
    notifier.watchdog()
    assert [e.errno for e in errors] == [errno.ENOENT, errno.ENOENT]
    Notifier(str(tmp_path / "nobody-listens")).ready()  # the default handler ignores it


def test_unsupported_address_is_reported() -> None:
    errors: list[OSError] = []
    Notifier("vsock:2:1234", on_error=errors.append).ready()
    assert [e.errno for e in errors] == [errno.EAFNOSUPPORT]
    assert "vsock:2:1234" in str(errors[0])


def test_a_stuck_systemd_does_not_block_for_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import migrated.sdnotify as sdnotify

    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT_S", 0.1)
    path = str(tmp_path / "full.sock")
    full = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    full.bind(path)
    errors: list[OSError] = []
    notifier = Notifier(path, on_error=errors.append)
    start = time.monotonic()
    while not errors and time.monotonic() - start < 30:  # until the receive queue is full
        notifier.status("x" * 1000)
    assert errors and isinstance(errors[0], (TimeoutError, BlockingIOError))
    full.close()
    notifier.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", "self", 15.0),
        ("30000000", None, 15.0),  # no WATCHDOG_PID: meant for us
        ("1000000", "self", 0.5),
        ("30000000", "1", None),  # inherited from a parent that systemd watches
        ("30000000", "not-a-pid", None),
        (None, None, None),
        ("0", "self", None),
        ("-5", "self", None),
        ("soon", "self", None),
        ("", "self", None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    env = {}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert Notifier.from_environ(env).watchdog_interval_s() == expected
