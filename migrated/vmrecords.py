"""Which VMs this daemon hosts, on disk: what a daemon that died leaves behind for the next one.

Every VM the daemon hosts has a record, `STATE_DIR/vms/NAME.json` (written atomically and
fsync'd), from its creation (or arrival) until it is stopped or released to a target. The VMs die
with the daemon process that owns their fds, so a record still there when a daemon starts names a
VM that died with its predecessor. The new daemon moves each such record to `STATE_DIR/lost/`,
reports it (an event per VM, `migratectl vm list --lost`), and keeps it until the operator says
`migratectl vm forget NAME`. A daemon stopped cleanly (SIGTERM) stops its VMs too and leaves
their records marked `stopped_with_daemon`, so they are reported the same way. The migration
records (`STATE_DIR/migrations/`) tell the one case in which the VM may live on elsewhere: COMMIT
may have gone out, so the target may be running it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Record files are small; anything bigger is not ours (and is not read into memory).
MAX_RECORD_BYTES = 64 * 1024

# A migration record in one of these states: the source may have sent COMMIT, so the target may
# run the VM. "committing" is written before the pause (source.py `_downtime`), "committed" by
# older releases just before COMMIT.
COMMIT_MAY_HAVE_GONE_OUT = frozenset({"committing", "committed"})


@dataclass(frozen=True)
class LostVm:
    name: str
    state: str  # what it was when its daemon died: running, paused, incoming, migrating...
    since: float  # when the record was last written (Unix time)
    pid: int  # the daemon process it died with
    detail: str  # what it means for the operator

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class VmRecords:
    def __init__(self, state_dir: Path) -> None:
        self._live = state_dir / "vms"
        self._lost = state_dir / "lost"
        self._migrations = state_dir / "migrations"

    def write(self, name: str, state: str, **extra: Any) -> None:
        record = {"name": name, "state": state, "since": time.time(), "pid": os.getpid(), **extra}
        _write_atomically(self._live / f"{name}.json", record)

    def remove(self, name: str) -> None:
        try:
            (self._live / f"{name}.json").unlink()
        except FileNotFoundError:
            pass

    def recover(self) -> list[LostVm]:
        """The records a dead predecessor left: moved to `lost/` and returned."""
        found = []
        for path in sorted(self._live.glob("*.json")) if self._live.is_dir() else []:
            record = _read(path)
            if record is None or record.get("pid") == os.getpid():
                continue
            lost = LostVm(
                name=str(record.get("name", path.stem)),
                state=str(record.get("state", "unknown")),
                since=float(record.get("since", 0.0)),
                pid=int(record.get("pid", 0)),
                detail=self._detail(
                    str(record.get("name", path.stem)),
                    str(record.get("state", "")),
                    bool(record.get("stopped_with_daemon", False)),
                ),
            )
            _write_atomically(self._lost / path.name, lost.as_dict())
            path.unlink()
            found.append(lost)
        return found

    def lost(self) -> list[LostVm]:
        vms = []
        for path in sorted(self._lost.glob("*.json")) if self._lost.is_dir() else []:
            record = _read(path)
            if record is not None:
                vms.append(LostVm(**{k: record[k] for k in LostVm.__dataclass_fields__ if k in record}))
        return vms

    def forget(self, name: str) -> bool:
        try:
            (self._lost / f"{name}.json").unlink()
            return True
        except FileNotFoundError:
            return False

    def _detail(self, name: str, state: str, stopped_with_daemon: bool = False) -> str:
        committed_to = [
            str(r.get("target"))
            for r in (_read(p) for p in self._migrations.glob("*.json"))
            if r is not None and r.get("vm") == name and r.get("state") in COMMIT_MAY_HAVE_GONE_OUT
        ]
        if committed_to:
            return (
                f"COMMIT may have gone out to {committed_to[-1]}: the VM may be running there; ask that daemon "
                "(migratectl vm list) before starting it anywhere else"
            )
        if stopped_with_daemon:
            return "stopped when its daemon was stopped (SIGTERM); start it again from its image or a backup"
        if state == "incoming":
            # Written when the copy was built, replaced after RUNNING: a daemon that died between
            # the resume and that record (a few ms) leaves it too, with the VM running here.
            return (
                "an incoming migration died here before its record said running: if COMMIT had "
                "not come, the source keeps or resumes the VM; if it had, the VM ran here and died "
                "with this daemon (the source then reports it released or in doubt: `migratectl "
                "migration status` there)"
            )
        return "its daemon process died and the VM with it; start it again from its image or a backup"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_atomically(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as file:
        json.dump(record, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
