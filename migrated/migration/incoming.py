"""The target's book of incoming migrations: the ones in progress, admitted against the limits
of the configuration before anything of their VM is allocated, and a short history of how the
finished ones ended, which is all an in-doubt source may ask about later (DESIGN 5 and 6).

Nothing here holds a finished migration's VM, buffers or connection: a history entry is its id
and one word.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import trio

Outcome = Literal["loaded", "running", "aborted"]

# A source in doubt asks within seconds to minutes of losing its link; 1,024 ids of a few dozen
# bytes each cover far more migrations than can finish in that time.
HISTORY_ENTRIES = 1024


class Incoming:
    def __init__(self) -> None:
        self.live: dict[str, Any] = {}  # migration id -> its Target, until the connection ends
        self._memory: dict[str, int] = {}  # migration id -> guest RAM bytes it was admitted with
        self._history: OrderedDict[str, Outcome] = OrderedDict()
        self._admitted = trio.Event()  # set (and replaced) at every admission

    def admit(self, migration_id: str, target: Any, memory_bytes: int, max_count: int, max_memory_bytes: int) -> None:
        """Count `target` in, or raise ValueError naming the limit it would break (and the key)."""
        if migration_id in self.live or migration_id in self._history:
            raise ValueError(f"migration id {migration_id!r} was already used on this daemon")
        if len(self.live) >= max_count:
            raise ValueError(
                f"{len(self.live)} incoming migrations in progress, the most this daemon accepts "
                f"(migration.max_incoming = {max_count}); try again later"
            )
        claimed = sum(self._memory.values())
        if claimed + memory_bytes > max_memory_bytes:
            raise ValueError(
                f"{memory_bytes >> 20} MiB of guest RAM would bring incoming migrations to "
                f"{(claimed + memory_bytes) >> 20} MiB, over migration.max_incoming_memory_mib = "
                f"{max_memory_bytes >> 20}"
            )
        self.live[migration_id] = target
        self._memory[migration_id] = memory_bytes
        self._admitted.set()
        self._admitted = trio.Event()

    async def wait_live(self, migration_id: str, timeout_s: float) -> Any:
        """The migration's Target once admitted, waiting up to `timeout_s` for that (None if
        it is not): its source sends the description before it connects its data streams, but
        this daemon's event loop may take up a stream before it reads that description."""
        with trio.move_on_after(timeout_s):
            while migration_id not in self.live and migration_id not in self._history:
                await self._admitted.wait()
        return self.live.get(migration_id)

    def leave(self, migration_id: str) -> None:
        """The connection of this migration ended: its admission is free for another."""
        self.live.pop(migration_id, None)
        self._memory.pop(migration_id, None)

    def record(self, migration_id: str, outcome: Outcome) -> None:
        self._history[migration_id] = outcome
        self._history.move_to_end(migration_id)
        while len(self._history) > HISTORY_ENTRIES:
            self._history.popitem(last=False)

    def outcome(self, migration_id: str) -> Outcome | None:
        return self._history.get(migration_id)

    def __len__(self) -> int:
        return len(self.live)
