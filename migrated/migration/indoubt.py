"""A source's migration in doubt (DESIGN section 5): the link broke after COMMIT went out and
before RUNNING came back, so only the target knows whether it runs the VM. It is asked (or an
operator decides); the paused copy here is released or resumed on that answer, never blindly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from transport import Query, QueryResult, VmDescription

from ..peer import PeerChannel, PeerError
from .stats import MigrationStats

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from .host import MigrationHost


class InDoubt:
    """How `Source` settles a migration in doubt; the attributes are Source's."""

    daemon: MigrationHost
    stats: MigrationStats
    log: FilteringBoundLogger
    committed: bool

    if TYPE_CHECKING:  # Source's

        async def _release(self, how: str, timed: bool = False) -> None: ...
        async def _resume_here(self) -> None: ...
        def _record_after(self, state: str) -> None: ...
        async def _connect(self, timed: bool = False, then: VmDescription | None = None) -> PeerChannel: ...

    async def resolve(self, attempts: int = 0, interval_s: float = 1.0) -> str:
        """Ask the target what became of the migration until it answers (0 = forever).

        "running": release the paused copy here. "aborted" / "unknown": the target discarded
        (or never had) the VM; only then resume here.
        """
        tries = 0
        while True:
            tries += 1
            try:
                answer = await self._query()
            except (PeerError, OSError, trio.TooSlowError) as err:
                self.log.info("in_doubt_query_failed", error=str(err), attempt=tries)
                if attempts and tries >= attempts:
                    return "in-doubt"
                await trio.sleep(interval_s)
                continue
            self.log.info("in_doubt_resolved", target_says=answer)
            if answer == "running":
                self.stats.downtime_ms = None
                await self._release("completed")
            else:
                self.committed = False
                self._record_after(f"resumed-after-{answer}")
                await self._resume_here()
                # Published last, as `_fail` does: whoever sees "aborted" finds the VM running here.
                self.stats.state = self.stats.phase = "aborted"
            return answer

    async def _query(self) -> str:
        channel = await self._connect()
        try:
            await channel.send(Query(self.stats.migration_id))
            with trio.fail_after(self.daemon.config.peer.message_timeout_s):
                result = await channel.expect(QueryResult)
            return result.state
        finally:
            await channel.aclose()

    async def resolve_by_operator(self, action: str) -> None:
        if action == "release":
            await self._release("completed-by-operator")
        elif action == "resume":
            self.committed = False
            self._record_after("resumed-by-operator")
            await self._resume_here()
            self.stats.state = self.stats.phase = "aborted"  # published last (see `resolve`)
        else:
            raise ValueError(f"action {action!r}: allowed are release, resume")
