"""QEMU processes driven over QMP, for bench/vs_qemu.py (a module, not a benchmark script).

QMP is JSON lines over a Unix socket: a greeting, `qmp_capabilities`, then one reply per command,
with asynchronous events interleaved (skipped here). Only the standard library is used, so the
benchmark needs nothing beyond QEMU itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
MISSING = (
    f"{QEMU} not found on PATH: this benchmark compares migrated with QEMU on the same machine. "
    "Install it (Debian 12 ships QEMU 7.2): apt-get install -y qemu-system-x86"
)
# QEMU 7.2 under this host's KVM (kvm_pvm) aborts on MSR 0x10a with plain `-cpu host`
# (HOST-NOTES.md), so the CPU model drops arch-capabilities.
CPU = "host,-arch-capabilities"
# QEMU's default max-bandwidth is 128 MiB/s (MAX_THROTTLE); a comparison of engines must not
# measure a throttle. 64 GiB/s is far above what loopback moves here.
UNTHROTTLED_BYTES_S = 64 << 30
FINISHED = ("completed", "failed", "cancelled")


# QEMU's migration over TLS (tls-creds-x509): each process holds a client and a server credential,
# since a ping-pong target becomes the next source. The peer checks the other's certificate (both
# ways: verify-peer on the server), as migrated's peers authenticate each other.
TLS_CLIENT, TLS_SERVER = "tls-client", "tls-server"
TLS_HOSTNAME = "127.0.0.1"


class QmpError(RuntimeError):
    """QEMU answered a QMP command with an error, or the QMP socket broke."""


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.splitlines()[0] if out else "unknown"


class Qmp:
    """One QMP connection: `execute(command, **arguments)` returns the reply's "return"; the
    events that arrive meanwhile are kept in `events` (each with QEMU's timestamp)."""

    def __init__(self, path: Path, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if process.poll() is not None:
                    raise QmpError(
                        f"QEMU exited with {process.returncode} before its QMP socket {path} opened"
                    ) from None
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path} did not open within {timeout} s") from None
                time.sleep(0.02)
        sock.settimeout(timeout)
        self._sock = sock
        self._reader = sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise QmpError("QMP socket closed by QEMU")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('class')}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


@dataclass
class QemuProcess:
    """One QEMU process with its QMP socket and serial console in `workdir`."""

    name: str
    workdir: Path
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    qmp: Qmp | None = None

    @property
    def qmp_path(self) -> Path:
        return self.workdir / f"{self.name}.qmp"

    @property
    def console_path(self) -> Path:
        return self.workdir / f"{self.name}.console"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> QemuProcess:
        self.qmp_path.unlink(missing_ok=True)
        command = [
            *self.argv,
            "-display",
            "none",
            "-nodefaults",
            "-serial",
            f"file:{self.console_path}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self.qmp = Qmp(self.qmp_path, self.process)
        except QmpError as err:
            self.kill()
            raise QmpError(f"{self.name}: {err}\n{self.log()}") from None
        return self

    def execute(self, command: str, **arguments: Any) -> Any:
        assert self.qmp is not None, f"{self.name} not started"
        return self.qmp.execute(command, **arguments)

    def console(self) -> str:
        return self.console_path.read_text(errors="replace") if self.console_path.exists() else ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def quit(self) -> None:
        """`quit` over QMP, then wait for the process; killed if it does not go."""
        if self.process is not None and self.process.poll() is None and self.qmp is not None:
            try:
                self.qmp.execute("quit")
                self.process.wait(timeout=20)
            except (QmpError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


def machine_args(binary: str, memory_mib: int, memory_object: str, dirty_ring_entries: int = 0) -> list[str]:
    """A pc machine with 1 vCPU whose RAM is the memory backend `memory_object` (id m0)."""
    accel = f"kvm,dirty-ring-size={dirty_ring_entries}" if dirty_ring_entries else "kvm"
    return [
        binary,
        "-accel",
        accel,
        "-cpu",
        CPU,
        "-m",
        str(memory_mib),
        "-smp",
        "1",
        "-object",
        memory_object,
        "-machine",
        "pc,memory-backend=m0",
    ]


def file_backend(path: Path, memory_mib: int) -> str:
    """Guest RAM in a shared file: another process can read it (the memory check)."""
    return f"memory-backend-file,id=m0,size={memory_mib}M,mem-path={path},share=on"


def ram_backend(memory_mib: int) -> str:
    # The same id as the source's backend: QEMU matches RAM blocks by id ("Unknown ramblock").
    return f"memory-backend-ram,id=m0,size={memory_mib}M"


def tls_certificates(directory: Path) -> Path:
    """A CA and a certificate and key for each end, signed by it, for 127.0.0.1, in `directory`
    under the names QEMU's tls-creds-x509 reads (ca-cert.pem, server-*.pem, client-*.pem)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*arguments: str) -> None:
        subprocess.run(["openssl", *arguments], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
            "-days", "2", "-subj", "/CN=vs-qemu bench CA")  # fmt: skip
    (directory / "ext.cnf").write_text(
        f"subjectAltName=IP:{TLS_HOSTNAME}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for end in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{end}-key.pem", "-out", f"{end}.csr",
                "-subj", f"/CN={TLS_HOSTNAME}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{end}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-out", f"{end}-cert.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return directory


def tls_args(certificates: Path) -> list[str]:
    """Both credentials of a process that may receive a migration and later send it on."""
    return [
        "-object",
        f"tls-creds-x509,id={TLS_CLIENT},dir={certificates},endpoint=client",
        "-object",
        f"tls-creds-x509,id={TLS_SERVER},dir={certificates},endpoint=server,verify-peer=on",
    ]


def use_tls(process: QemuProcess, endpoint: str) -> None:
    """The next migration out (TLS_CLIENT) or in (TLS_SERVER) of `process` goes over TLS."""
    parameters: dict[str, Any] = {"tls-creds": endpoint}
    if endpoint == TLS_CLIENT:
        parameters["tls-hostname"] = TLS_HOSTNAME
    process.execute("migrate-set-parameters", **parameters)


def listen_incoming(target: QemuProcess, port: int, tls: bool = False) -> None:
    """A target started with `-incoming defer` listens once this returns."""
    enable_events(target)
    if tls:
        use_tls(target, TLS_SERVER)
    target.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")


def event_time(process: QemuProcess, name: str, **data: Any) -> float | None:
    """QEMU's timestamp (seconds, host real-time clock) of the last event `name` whose data
    holds `data`; None if none arrived (yet)."""
    assert process.qmp is not None
    for event in reversed(process.qmp.events):
        if event["event"] == name and all(event.get("data", {}).get(k) == v for k, v in data.items()):
            stamp = event["timestamp"]
            return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
    return None


def wait_event_time(process: QemuProcess, name: str, timeout: float = 10.0, **data: Any) -> float:
    deadline = time.monotonic() + timeout
    while True:
        stamp = event_time(process, name, **data)
        if stamp is not None:
            return stamp
        if time.monotonic() > deadline:
            raise QmpError(f"{process.name}: no {name} {data} event within {timeout} s")
        process.execute("query-status")  # events are read while waiting for a reply
        time.sleep(0.005)


def enable_events(process: QemuProcess) -> None:
    """MIGRATION events (status changes, timestamped): the benchmark's own clock on QEMU."""
    process.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])


def migrate(
    source: QemuProcess, port: int, downtime_limit_ms: int, timeout: float, tls: bool = False
) -> dict[str, Any]:
    """Migrate `source` to the target listening on `port`; poll `query-migrate` until it ends.

    Past `timeout` seconds the migration is cancelled (a guest that never converges under the
    limit); the source runs on, as QEMU leaves it after a cancel. Returns the last query-migrate
    reply (status, total-time, downtime, setup-time, ram), with the source's event times under
    "events_s": setup, stop (the VM paused for the last pass) and completed. `tls`: over TLS
    (both processes made with `tls_args`, the target listening with `tls`)."""
    assert source.qmp is not None
    enable_events(source)
    source.qmp.events.clear()
    source.execute(
        "migrate-set-parameters", **{"downtime-limit": downtime_limit_ms, "max-bandwidth": UNTHROTTLED_BYTES_S}
    )
    if tls:
        use_tls(source, TLS_CLIENT)
    source.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    cancelled = False
    while True:
        info: dict[str, Any] = source.execute("query-migrate")
        if info.get("status") in FINISHED:
            info["cancelled_after_s"] = timeout if cancelled else None
            if info["status"] == "completed":
                # "completed" shows before QEMU has computed total-time and downtime (they read 0
                # then); the source enters "postmigrate" after it has.
                wait_run_state(source, "postmigrate")
                info = {**source.execute("query-migrate"), "cancelled_after_s": info["cancelled_after_s"]}
                completed = wait_event_time(source, "MIGRATION", status="completed")  # reads all before it
                info["events_s"] = {
                    "setup": event_time(source, "MIGRATION", status="setup"),
                    "stop": event_time(source, "STOP"),
                    "completed": completed,
                }
            return info
        if not cancelled and time.monotonic() > deadline:
            source.execute("migrate_cancel")
            cancelled = True
        time.sleep(0.01)


def wait_run_state(process: QemuProcess, state: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := process.execute("query-status")["status"]) != state:
        if time.monotonic() > deadline:
            raise QmpError(f"{process.name} still {status!r}, not {state!r}, after {timeout} s")
        time.sleep(0.005)


def wait_incoming_done(target: QemuProcess, timeout: float = 60.0) -> str:
    """Wait until the target has left "inmigrate"; its run state then ("paused" with -S)."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(target.execute("query-status")["status"])
        if status != "inmigrate":
            return status
        if time.monotonic() > deadline:
            raise QmpError(f"{target.name} still in 'inmigrate' after {timeout} s")
        time.sleep(0.01)


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
