"""The state directory: checked when the daemon starts, written only whole (DESIGN 5 records).

A record is what survives a crash of this daemon (who owns a migrated VM), so it is either
on disk complete and fsync'd, or not at all: a full disk gives an error naming the path, never a
truncated file. Problems are found at start-up where they can be: a state dir that is not a
directory, not writable or already full stops the start with its path in the message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Records are a few hundred bytes; less free space than this means the disk is as good as full.
MIN_FREE_BYTES = 1 << 20


class StateDirError(Exception):
    """The state directory cannot hold what it must; the message names the path."""


def check_state_dir(path: Path) -> None:
    """Create `path` if missing; refuse it unless it is a writable directory with free space."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise StateDirError(f"state dir {path} exists but is not a directory (daemon.state_dir)") from None
    except OSError as err:
        raise StateDirError(f"state dir {path} cannot be created: {err.strerror} (daemon.state_dir)") from None
    if not path.is_dir():
        raise StateDirError(f"state dir {path} exists but is not a directory (daemon.state_dir)")
    probe = path / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise StateDirError(f"state dir {path} is not writable: {err.strerror} (daemon.state_dir)") from None
    fs = os.statvfs(path)
    free = fs.f_bavail * fs.f_frsize
    if free < MIN_FREE_BYTES:
        raise StateDirError(
            f"state dir {path} has {free} bytes free, less than the {MIN_FREE_BYTES} it needs (daemon.state_dir)"
        )


def write_record(directory: Path, name: str, record: dict[str, Any]) -> Path:
    """`directory/name.json`, complete and fsync'd, or StateDirError and no file at all."""
    path = directory / f"{name}.json"
    tmp = directory / f"{name}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as file:
            json.dump(record, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash only once its directory is synced
        finally:
            os.close(dir_fd)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StateDirError(f"cannot write the record {path}: {err.strerror}") from None
    return path
