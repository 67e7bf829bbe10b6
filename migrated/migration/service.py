"""Migrations as daemon services: the peer listener and the migration control commands."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio

from transport import RemoteProtocolError
from transport.datastream import MAX_STREAMS

from ..accepting import accept_forever
from ..control import RequestError
from ..hosted import VmState
from ..kvm.backing import MEMORY_BACKINGS
from ..logs import get_logger
from .host import CommandArgs, CommandReply, MigrationHost, Migration
from .source import Source, SourceOptions, new_migration_id
from .recvstreams import accept_hello, is_data_stream
from .target import DataStreamUnused, Target

# Data connections in their handshake at once: each may hold a TLS thread until its deadline.
MAX_DATA_HANDSHAKES = 8
# How long a data stream waits for its migration to be admitted: the description is in this
# daemon's socket before the stream connects, so only the event loop's order is in between.
ADMISSION_GRACE_S = 1.0


async def _first_byte_is_data(stream: trio.SocketStream, deadline: float) -> bool:
    """A data connection starts with datastream.MAGIC; a control one with a frame or TLS. The
    byte is peeked, not read: a control connection's Target reads it again."""
    with trio.move_on_at(deadline):
        try:
            return is_data_stream(await stream.socket.recv(1, socket.MSG_PEEK))
        except OSError:
            return False
    return False


async def accept_data_stream(
    daemon: MigrationHost,
    stream: trio.SocketStream,
    peer: str,
    log: Any,
    handshakes: trio.CapacityLimiter,
    deadline: float,
) -> None:
    """A data stream: its hello, then its migration's Target gives it a thread, or it is closed."""
    try:
        handshakes.acquire_nowait()
    except trio.WouldBlock:
        log.warning("data_stream_refused", peer=peer, error="too many data stream handshakes at once")
        await stream.aclose()
        return
    sock = None
    in_handshake = True
    warm = None
    try:
        with trio.fail_at(deadline):
            hello, sock = await accept_hello(stream, daemon.config.peer)
            # A warm stream of an idle link (warmlinks.py) proves which by its token at once.
            target = warm = daemon.idle_links.owner(hello)
            if target is None:
                # Until its migration is admitted the stream has proved nothing (its token is
                # checked against that migration's secret), so it keeps its handshake slot: a
                # flood of hellos naming no migration holds at most MAX_DATA_HANDSHAKES fds,
                # each for the grace.
                target = await daemon.incoming.wait_live(hello.migration_id, ADMISSION_GRACE_S)
                if target is None:  # a warm stream whose link had not gone idle when it came
                    target = warm = daemon.idle_links.owner(hello)
            if target is None:
                raise RemoteProtocolError(
                    f"data stream for migration {hello.migration_id!r}, which is not in progress here"
                )
            # A stream that waits for its migration's VM (and proves it is that migration's,
            # `attach_data_stream`, bounded by the streams announced) holds no slot meanwhile.
            handshakes.release()
            in_handshake = False
            if warm is None:
                await target.attach_data_stream(hello, sock)
        if warm is not None:
            # Held until its link's description and RAM, or the link's end (its idle deadline,
            # then the migration's), not this connection's setup deadline.
            await warm.attach_data_stream(hello, sock)
        sock = None  # its thread owns it now
        log.info("data_stream_attached", peer=peer, migration_id=hello.migration_id, index=hello.index)
    except DataStreamUnused as err:
        # Expected where a source stops with an idle link (its warm streams wait for it) or a
        # migration fails before its streams ran: the migration's end is logged on its own.
        log.info("data_stream_unused", peer=peer, reason=str(err))
    except (RemoteProtocolError, OSError, ssl.SSLError, trio.TooSlowError) as err:
        log.warning("data_stream_refused", peer=peer, error=str(err) or type(err).__name__)
    finally:
        if in_handshake:
            handshakes.release()
        if sock is not None:
            sock.close()
        await stream.aclose()


class PeerListenError(OSError):
    """peer.listen cannot be bound or resolved; the message names the address."""

    def __str__(self) -> str:
        return str(self.strerror)


async def serve_peers(daemon: MigrationHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    log = get_logger(component="peer_listener")
    listen = daemon.config.peer.listen
    handshakes = trio.CapacityLimiter(MAX_DATA_HANDSHAKES)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "unknown"
        try:
            # One setup deadline for the connection, whichever kind it turns out to be.
            deadline = trio.current_time() + daemon.config.peer.connect_timeout_s
            if await _first_byte_is_data(stream, deadline):
                await accept_data_stream(daemon, stream, peer, log, handshakes, deadline)
            else:
                await Target(daemon, stream, peer, setup_deadline=deadline).run()
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
    # Not trio.serve_listeners: it logs every retry of an EMFILE episode; ours logs it once.
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_forever, listener.accept, handle, nursery, f"peer {listen}")


def _number(args: CommandArgs, key: str, default: float, low: float, high: float) -> float:
    value = args.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{key} {value!r}: a number from {low:g} to {high:g}")
    return float(value)


NO_CONVERGENCE = ("abort", "force-downtime", "throttle", "dirty-limit")


def _choice(args: CommandArgs, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = args.get(key)
    if value is None:
        return default
    if value not in allowed:
        raise RequestError(f"{key} {value!r}: allowed are {', '.join(allowed)}")
    return str(value)


def _parse_to(value: object) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise RequestError(f"--to {value!r}: HOST:PORT, e.g. 127.0.0.1:7890 or [::1]:7890")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise RequestError(f"--to {value!r}: HOST:PORT with a port from 1 to 65535")
    return host, int(port_text)


class MigrationService:
    def __init__(self, daemon: MigrationHost) -> None:
        self.daemon = daemon

    async def cmd_migrate(self, args: CommandArgs) -> CommandReply:
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
            on_no_convergence=_choice(args, "on_no_convergence", defaults.on_no_convergence, NO_CONVERGENCE),
            verify=defaults.verify,
            max_batch_bytes=defaults.max_batch_bytes,
            downtime_guard_ms=_number(args, "downtime_guard_ms", defaults.downtime_guard_ms, 0, 600_000),
            completion_timeout_per_gib_s=_number(
                args, "completion_timeout_per_gib_s", defaults.completion_timeout_per_gib_s, 0, 86400
            ),
            progress_timeout_s=_number(args, "progress_timeout_s", defaults.progress_timeout_s, 0, 86400),
            target_memory_backing=_choice(args, "target_memory_backing", "", MEMORY_BACKINGS) or None,
            streams=int(_number(args, "streams", defaults.streams, 1, MAX_STREAMS)),
        )
        verify = args.get("verify")
        if verify is not None:
            if verify not in ("full", "off"):
                raise RequestError(f"verify {verify!r}: allowed are full, off")
            options = SourceOptions(**{**options.__dict__, "verify": verify})
        source = Source(daemon, hosted, options, new_migration_id())
        daemon.migrations[hosted.name] = source
        daemon.start_task(source.run)
        return source.stats.as_dict()

    def _migration(self, args: CommandArgs) -> Migration:
        name = args.get("name")
        if not isinstance(name, str):
            raise RequestError('"name" (a string) is required')
        migration = self.daemon.migrations.get(name)
        if migration is None:
            raise RequestError(f"no migration of a VM named {name!r} on this daemon")
        return migration

    async def cmd_status(self, args: CommandArgs) -> CommandReply:
        migration = self._migration(args)
        stats = migration.stats
        return None if stats is None else stats.as_dict()

    async def cmd_cancel(self, args: CommandArgs) -> CommandReply:
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

    async def cmd_set(self, args: CommandArgs) -> CommandReply:
        """migrate-set-parameters: change a running migration's downtime limit or bandwidth cap."""
        migration = self._migration(args)
        if not isinstance(migration, Source):
            raise RequestError("an incoming migration's parameters are set on its source")
        if migration.stats.state not in ("setup", "bulk", "rounds"):
            raise RequestError(f"migration is {migration.stats.state}: its parameters can no longer change")
        changes: dict[str, float] = {}
        if args.get("downtime_limit_ms") is not None:
            changes["downtime_limit_ms"] = _number(args, "downtime_limit_ms", 0, 1, 60000)
        if args.get("max_bandwidth_mib_s") is not None:
            changes["max_bandwidth_mib_s"] = _number(args, "max_bandwidth_mib_s", 0, 0, 1 << 20)
        if not changes:
            raise RequestError("nothing to set: give downtime_limit_ms and/or max_bandwidth_mib_s")
        migration.set_parameters(**changes)
        return migration.stats.as_dict()

    async def cmd_resolve(self, args: CommandArgs) -> CommandReply:
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


async def start_migration_service(daemon: MigrationHost, nursery: trio.Nursery) -> None:
    service = MigrationService(daemon)
    daemon.commands.update(
        {
            "migrate": service.cmd_migrate,
            "migration.status": service.cmd_status,
            "migration.cancel": service.cmd_cancel,
            "migration.resolve": service.cmd_resolve,
            "migration.set": service.cmd_set,
        }
    )
    await nursery.start(serve_peers, daemon)
    await nursery.start(daemon.warm_links.serve)
