"""Migrations as daemon services: the peer listener and the migration control commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from ..control import RequestError
from ..hosted import VmState
from ..logs import get_logger
from .source import Source, SourceOptions, new_migration_id
from .target import Target

if TYPE_CHECKING:
    from ..daemon import Daemon


class PeerListenError(OSError):
    """peer.listen cannot be bound or resolved; the message names the address."""

    def __str__(self) -> str:
        return str(self.strerror)


async def serve_peers(daemon: Daemon, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    log = get_logger(component="peer_listener")
    listen = daemon.config.peer.listen

    async def handle(stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "unknown"
        try:
            await Target(daemon, stream, peer).run()
        except Exception:  # one peer must never take the listener (or the daemon) down
            log.exception("peer_connection_crashed", peer=peer)

    try:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host or None)
    except OSError as err:
        # "[Errno 98] Address already in use" alone does not say which address, nor that it
        # came from peer.listen.
        cause = err.strerror or str(err)
        raise PeerListenError(err.errno or 0, f"cannot listen for peers on {listen} (peer.listen): {cause}") from err
    log.info("peer_listening", listen=str(listen))
    task_status.started()
    await trio.serve_listeners(handle, listeners)


def _number(args: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = args.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{key} {value!r}: a number from {low:g} to {high:g}")
    return float(value)


def _parse_to(value: Any) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise RequestError(f"--to {value!r}: HOST:PORT, e.g. 127.0.0.1:7890 or [::1]:7890")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise RequestError(f"--to {value!r}: HOST:PORT with a port from 1 to 65535")
    return host, int(port_text)


class MigrationService:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def cmd_migrate(self, args: dict[str, Any]) -> Any:
        daemon = self.daemon
        hosted = daemon.hosted(args)
        if hosted.state not in (VmState.RUNNING, VmState.PAUSED):
            raise RequestError(f"VM {hosted.name} is {hosted.state.value}: only a running or paused VM migrates")
        current = daemon.migrations.get(hosted.name)
        if isinstance(current, Source) and current.stats.state in (
            "setup",
            "bulk",
            "rounds",
            "downtime",
            "cutover",
            "in-doubt",
        ):
            raise RequestError(f"VM {hosted.name} is already migrating ({current.stats.state})")
        host, port = _parse_to(args.get("to"))
        defaults = daemon.config.migration
        options = SourceOptions(
            host=host,
            port=port,
            downtime_limit_ms=_number(args, "downtime_limit_ms", defaults.downtime_limit_ms, 1, 60000),
            max_bandwidth_mib_s=_number(args, "max_bandwidth_mib_s", defaults.max_bandwidth_mib_s, 0, 1 << 20),
            timeout_s=_number(args, "timeout_s", defaults.timeout_s, 1, 86400),
            max_rounds=int(_number(args, "max_rounds", defaults.max_rounds, 1, 10000)),
            on_no_convergence=defaults.on_no_convergence,
            verify=defaults.verify,
            max_batch_bytes=defaults.max_batch_bytes,
        )
        verify = args.get("verify")
        if verify is not None:
            if verify not in ("full", "off"):
                raise RequestError(f"verify {verify!r}: allowed are full, off")
            options = SourceOptions(**{**options.__dict__, "verify": verify})
        source = Source(daemon, hosted, options, new_migration_id())
        daemon.migrations[hosted.name] = source
        daemon.nursery_start(source.run)
        return source.stats.as_dict()

    def _migration(self, args: dict[str, Any]) -> Any:
        name = args.get("name")
        if not isinstance(name, str):
            raise RequestError('"name" (a string) is required')
        migration = self.daemon.migrations.get(name)
        if migration is None:
            raise RequestError(f"no migration of a VM named {name!r} on this daemon")
        return migration

    async def cmd_status(self, args: dict[str, Any]) -> Any:
        migration = self._migration(args)
        stats = migration.stats
        return None if stats is None else stats.as_dict()

    async def cmd_cancel(self, args: dict[str, Any]) -> Any:
        migration = self._migration(args)
        if not isinstance(migration, Source):
            raise RequestError("an incoming migration is cancelled from its source")
        if migration.committed:
            raise RequestError(
                "COMMIT was sent: the VM belongs to the target now; resolve an in-doubt "
                "migration with `migration resolve` instead"
            )
        if migration.stats.state not in ("setup", "bulk", "rounds", "downtime", "cutover"):
            raise RequestError(f"migration is {migration.stats.state}: nothing to cancel")
        migration.cancel("cancelled by the operator", by_operator=True)
        return {"name": migration.hosted.name, "cancelling": True}

    async def cmd_resolve(self, args: dict[str, Any]) -> Any:
        migration = self._migration(args)
        if not isinstance(migration, Source) or migration.stats.state != "in-doubt":
            raise RequestError("only an in-doubt migration (source side) is resolved")
        action = args.get("action", "ask")
        if action == "ask":
            answer = await migration.resolve(attempts=1)
            return {"target_says": answer, "state": migration.stats.state}
        if action not in ("release", "resume"):
            raise RequestError(f"action {action!r}: allowed are ask, release, resume")
        await migration.resolve_by_operator(action)
        return {"state": migration.stats.state}


async def start_migration_service(daemon: Daemon, nursery: trio.Nursery) -> None:
    service = MigrationService(daemon)
    daemon.commands.update(
        {
            "migrate": service.cmd_migrate,
            "migration.status": service.cmd_status,
            "migration.cancel": service.cmd_cancel,
            "migration.resolve": service.cmd_resolve,
        }
    )
    await nursery.start(serve_peers, daemon)
