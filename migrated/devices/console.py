"""The per-VM console log: what a raw guest's UART transmits, appended to a file as it goes.

Unbuffered, so `tail -f` shows every byte when the guest sends it; a raw guest on this host sends
at most some tens of KB/s (each byte is a port I/O exit), so a write per byte costs little. The
UART drops a sink that fails (a full disk) and goes on; `Uart8250.sink_error` says why.
"""

from __future__ import annotations

import os
from pathlib import Path

# Where a daemon keeps them: <state_dir>/console/<vm>.log
CONSOLE_DIR = "console"


def console_log_path(state_dir: Path, vm_name: str) -> Path:
    return state_dir / CONSOLE_DIR / f"{vm_name}.log"


class ConsoleLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._file = os.fdopen(fd, "ab", buffering=0)

    def write(self, data: bytes) -> None:
        """The UART's sink."""
        self._file.write(data)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ConsoleLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
