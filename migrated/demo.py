"""`make demo`: two daemons on this machine, a workload VM dirtying memory, a live migration.

Starts daemon A and daemon B (their own control sockets, ports and state dirs in a temporary
directory, one pre-shared key), creates a workload VM on A, migrates it to B with
`migratectl migrate --wait` (the live progress line, then the final stats), and shows the guest's
heartbeat going on on B with no verification error. Everything stops at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .control import RequestError, request


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Daemon:
    def __init__(self, name: str, work: Path, key: Path) -> None:
        self.name = name
        self.socket = work / f"{name}.sock"
        self.port = _free_port()
        self.log = work / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "migrated",
            "--control-socket",
            str(self.socket),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            str(work / f"{name}-state"),
            "--peer-key-file",
            str(key),
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.call("daemon.status")
                return
            except (RequestError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon {name} did not start: {self.log.read_text()}") from None
                time.sleep(0.05)

    def call(self, cmd: str, **args: Any) -> Any:
        return request(self.socket, cmd, args)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _guest_line(daemon: _Daemon, name: str) -> str:
    info = daemon.call("vm.show", name=name)
    guest = info["guest"]
    return (
        f"  {daemon.name}: {name} {info['state']}, heartbeat {guest['heartbeat_generation']}, "
        f"pages written {guest['pages_written']}, verification errors "
        f"{guest['verification_errors']}"
    )


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="migrated-demo-"))
    key = work / "peer.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    print(f"demo: daemons A and B on loopback, files in {work}")
    a = _Daemon("A", work, key)
    b = _Daemon("B", work, key)
    try:
        a.call(
            "vm.create",
            name="demo",
            memory_mib=args.memory,
            vcpus=args.vcpus,
            dirty_rate_mib_s=args.dirty_rate,
            working_set_mib=args.working_set,
        )
        print(
            f"demo: VM 'demo' on A: {args.memory} MiB, {args.vcpus} vCPUs, guest dirtying "
            f"{args.dirty_rate} MiB/s over {args.working_set} MiB"
        )
        for _ in range(3):
            time.sleep(0.5)
            print(_guest_line(a, "demo"))
        print(f"demo: migratectl migrate demo --to 127.0.0.1:{b.port} --wait")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "migrated.cli",
                "--socket",
                str(a.socket),
                "migrate",
                "demo",
                "--to",
                f"127.0.0.1:{b.port}",
                "--downtime-limit",
                str(args.downtime_limit),
                "--wait",
            ],
            check=False,
        )
        if result.returncode != 0:
            print("demo: the migration did not complete; the VM runs on A", file=sys.stderr)
            return 1
        print("demo: the guest goes on on B:")
        for _ in range(3):
            time.sleep(0.5)
            print(_guest_line(b, "demo"))
        final = b.call("vm.show", name="demo")
        ok = final["state"] == "running" and final["guest"]["verification_errors"] == 0
        print(json.dumps({"vm_on_b": final["state"], "verification_errors": final["guest"]["verification_errors"]}))
        return 0 if ok else 1
    finally:
        a.stop()
        b.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migrated.demo", description=__doc__)
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--working-set", type=int, default=256, help="MiB")
    parser.add_argument("--dirty-rate", type=float, default=64.0, help="MiB/s")
    parser.add_argument("--downtime-limit", type=float, default=300.0, help="ms")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
