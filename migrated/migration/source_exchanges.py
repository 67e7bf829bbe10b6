"""The target's exchanges with a source that are not a migration's own steps: the answer to a
source that asks after a lost link how a migration ended (DESIGN 5), and the source's timing,
read from its Close after RUNNING. Functions of the target (target.py), which calls them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import trio

from transport import Close, Query, QueryResult

from ..peer import PeerChannel, PeerError
from .host import MigrationHost
from .stats import MigrationStats

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

# How long the target waits, after RUNNING, for the source's Close with its timing: the source
# sends it right after RUNNING arrives; an older one only closes the link.
SOURCE_CLOSE_WAIT_S = 2.0


async def answer_query(daemon: MigrationHost, channel: PeerChannel, log: FilteringBoundLogger, query: Query) -> None:
    live: Any = daemon.incoming.live.get(query.migration_id)
    if live is not None:
        # Still on its first connection: unless COMMIT came, it aborts for good now, and
        # the answer waits for its recorded outcome (DESIGN 5: only then may the source resume).
        live.abort_for_good("the source asked after a lost link; no COMMIT came")
        with trio.move_on_after(daemon.config.peer.message_timeout_s):
            await live.finished.wait()
        if not live.finished.is_set():
            raise PeerError(f"migration {query.migration_id} is still being discarded; ask again")
    outcome = daemon.incoming.outcome(query.migration_id)
    answer: Literal["running", "aborted", "unknown"]
    if outcome is None:
        answer = "unknown"
    elif outcome == "running":
        answer = "running"
    else:
        answer = "aborted"
    log.info("query_answered", migration_id=query.migration_id, answer=answer)
    await channel.send(QueryResult(migration_id=query.migration_id, state=answer))


async def take_source_timing(channel: PeerChannel, stats: MigrationStats) -> None:
    """The downtime and total time as the source measured them, from its Close: only it can
    time them, and both sides then report the same numbers. A source that closes without
    them (an older release) or not at all leaves this side's own total time."""
    with trio.move_on_after(SOURCE_CLOSE_WAIT_S):
        try:
            event = await channel.receive()
        except PeerError:
            return
        if isinstance(event, Close):
            if event.downtime_us is not None:
                stats.downtime_ms = event.downtime_us / 1e3
            if event.total_us is not None:
                stats.total_ms = event.total_us / 1e3
            if event.guest_downtime_us is not None:
                stats.guest_downtime_ms = event.guest_downtime_us / 1e3
