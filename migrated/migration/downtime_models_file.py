"""The learned downtime costs per peer (policy.DowntimeModels), kept in the state dir, so that a
restarted daemon predicts from what it learned instead of from the defaults.

One small JSON record, versioned and size-capped, written whole (statedir.write_record: a temporary
file, fsync, rename) after each completed migration and read once at start-up. A file that is too
big, not JSON, of another version or with a bad value is reported by the caller in one event and
ignored: the daemon starts from the defaults, as it would without the file.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..statedir import write_record
from .policy import DowntimeModels

NAME = "downtime-models"
# 64 peers x 8 terms x 8 samples of two numbers is ~100 KiB of JSON: anything far beyond it was
# not written by this daemon and is not read into memory.
MAX_BYTES = 512 << 10

# Two migrations that complete together write one after the other (the same temporary file).
_write_lock = threading.Lock()


def models_path(state_dir: Path) -> Path:
    return state_dir / f"{NAME}.json"


def save_models(state_dir: Path, record: dict[str, object]) -> None:
    """`record` from `DowntimeModels.to_record`, taken on the event loop (the models change
    there); written here, in a worker thread. StateDirError (naming the path) if it cannot be."""
    with _write_lock:
        write_record(state_dir, NAME, record)


def load_models(state_dir: Path, clock: Callable[[], float] = time.monotonic) -> tuple[DowntimeModels, str | None]:
    """The models as last saved, or new ones and why the file was not used (None: there was no
    file, or it was used)."""
    path = models_path(state_dir)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return DowntimeModels(clock), None
    except OSError as err:
        return DowntimeModels(clock), f"{path}: cannot be read: {err.strerror}"
    if len(data) > MAX_BYTES:
        return DowntimeModels(clock), f"{path}: more than {MAX_BYTES} bytes, not written by this daemon"
    try:
        return DowntimeModels.from_record(json.loads(data), time.time(), clock), None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        # json.JSONDecodeError is a ValueError.
        return DowntimeModels(clock), f"{path}: {err}"
