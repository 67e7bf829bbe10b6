"""The control socket: a Unix stream socket (mode 0600, or 0660 with daemon.control_socket_group)
carrying one JSON object per line.

Request:  {"cmd": "vm.create", "args": {...}}
Response: {"ok": true, "result": {...}}  or  {"ok": false, "error": "what is wrong"}

One bad request gets an error answer; one bad connection is closed; the server goes on.
"""

from __future__ import annotations

import errno
import json
import os
import socket as stdlib_socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import trio

from .accepting import accept_forever
from .control_request import MAX_REQUEST_BYTES, RequestRefused, parse_request
from .events import EventStream
from .logs import get_logger
from .socket_access import restrict_control_socket

__all__ = ["MAX_REQUEST_BYTES", "ControlSocketInUseError", "RequestError", "request", "serve_control"]

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class RequestError(Exception):
    """The request is wrong; the message goes back to the client as is."""


class ControlSocketInUseError(RuntimeError):
    pass


def _claim_path(path: Path) -> None:
    """Remove a stale socket file; refuse if a live daemon answers on it."""
    if not path.exists() and not path.is_symlink():
        return
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ControlSocketInUseError(f"control socket {path} is in use by a running daemon")


async def serve_control(
    path: Path,
    handler: Handler,
    *,
    group: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    log = get_logger(component="control", socket=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _claim_path(path)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is created 0600: only root (or our user) talks
    try:
        await listener.bind(str(path))
    finally:
        os.umask(old_umask)
    try:
        restrict_control_socket(path, group)  # 0660 and the operators' group, if configured
    except BaseException:
        listener.close()
        path.unlink(missing_ok=True)
        raise
    listener.listen(128)
    log.info("control_listening", group=group)
    task_status.started()

    async def accept() -> trio.SocketStream:
        conn, _ = await listener.accept()
        return trio.SocketStream(conn)

    async def serve(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, handler)

    try:
        async with trio.open_nursery() as nursery:
            await accept_forever(accept, serve, nursery, "control")
    finally:
        listener.close()
        path.unlink(missing_ok=True)


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    log = get_logger(component="control")
    buffer = bytearray()
    async with stream:
        try:
            while True:
                newline = buffer.find(b"\n")
                if newline < 0:
                    if len(buffer) > MAX_REQUEST_BYTES:
                        await _send(stream, {"ok": False, "error": "request longer than 1 MiB"})
                        return
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                if newline > MAX_REQUEST_BYTES:
                    await _send(stream, {"ok": False, "error": "request longer than 1 MiB"})
                    return
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                answer = await _answer(line, handler, log)
                result = answer.get("result")
                if isinstance(result, EventStream):
                    await _stream_events(stream, result)
                    return
                if isinstance(result, ByteStream):
                    await _stream_bytes(stream, result)
                    return
                await _send(stream, answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:  # one connection must never take the server (or the daemon) down
            log.exception("control_connection_failed")


async def _answer(line: bytes, handler: Handler, log: Any) -> dict[str, Any]:
    try:
        parsed = parse_request(line)
    except RequestRefused as err:
        log.info("control_request_malformed", error=str(err), length=len(line))
        return {"ok": False, "error": str(err)}
    cmd = parsed.cmd
    try:
        return {"ok": True, "result": await handler(cmd, parsed.args)}
    except RequestError as err:
        log.info("control_request_refused", cmd=cmd, error=str(err))
        return {"ok": False, "error": str(err)}
    except Exception as err:  # one failed request must not take the daemon down
        log.exception("control_request_failed", cmd=cmd)
        return {"ok": False, "error": f"{cmd} failed: internal error: {type(err).__name__}: {err}"}


class ByteStream:
    """A control-command answer that is bytes: one JSON line (`header`, with the length), then
    exactly `length` raw bytes, read by `read(offset, size)` a chunk at a time."""

    CHUNK = 1 << 20

    def __init__(self, header: dict[str, Any], length: int, read: Callable[[int, int], bytes]) -> None:
        self.header = header
        self.length = length
        self.read = read


async def _stream_bytes(stream: trio.SocketStream, answer: ByteStream) -> None:
    await _send(stream, {"ok": True, "result": answer.header})
    offset = 0
    while offset < answer.length:
        chunk = answer.read(offset, min(ByteStream.CHUNK, answer.length - offset))
        await stream.send_all(chunk)
        offset += len(chunk)


async def _stream_events(stream: trio.SocketStream, events: EventStream) -> None:
    """One answer line, then an event per line until the client goes away."""
    subscription = events.subscription
    try:
        await _send(stream, {"ok": True, "result": "streaming"})
        async with trio.open_nursery() as nursery:
            # The client sends nothing more: its EOF (Ctrl-C on migratectl events) ends the stream.
            nursery.start_soon(_cancel_on_eof, stream, nursery.cancel_scope)
            async for event in subscription:
                await _send(stream, {"event": event})
    finally:
        subscription.close()


async def _cancel_on_eof(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message, default=str).encode() + b"\n")


def _connect(path: Path) -> stdlib_socket.socket:
    """A blocking connection to the daemon's control socket, or RequestError naming the socket."""
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        # Blocking connect: with a timeout set, a full listen backlog fails at once (EAGAIN)
        # instead of waiting for the daemon to accept.
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise RequestError(f"no daemon at {path}: the control socket does not exist") from None
    except ConnectionRefusedError:
        sock.close()
        raise RequestError(f"no daemon at {path}: connection refused") from None
    except PermissionError:
        sock.close()
        raise RequestError(
            f"no permission to use {path}: run as root, or as a member of the group the "
            "daemon's daemon.control_socket_group names"
        ) from None
    return sock


def _first_answer(path: Path, sock: stdlib_socket.socket, cmd: str, args: dict[str, Any]) -> tuple[Any, BinaryIO]:
    """Send one request; the answer's result (or RequestError) and the reader for what follows."""
    sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
    reader = sock.makefile("rb")
    line = reader.readline()
    if not line:
        raise RequestError(f"daemon at {path} closed the connection without an answer")
    answer = json.loads(line)
    if not answer.get("ok"):
        raise RequestError(answer.get("error", "unknown error"))
    return answer.get("result"), reader


def request(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Blocking client call (for migratectl): returns the result or raises RequestError."""
    sock = _connect(path)
    try:
        sock.settimeout(timeout)
        result, _ = _first_answer(path, sock, cmd, args or {})
        return result
    finally:
        sock.close()


def stream_events(path: Path, args: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Blocking client (for `migratectl events`): the daemon's events, one dict each, until the
    daemon goes away (or the caller stops iterating, which closes the connection)."""
    sock = _connect(path)
    try:
        _, reader = _first_answer(path, sock, "events", args or {})
        for line in reader:
            message = json.loads(line)
            if isinstance(message, dict) and isinstance(message.get("event"), dict):
                yield message["event"]
    finally:
        sock.close()


def request_bytes(path: Path, cmd: str, args: dict[str, Any], out: BinaryIO, timeout: float = 30.0) -> Any:
    """Blocking client call whose answer is bytes (`ByteStream`): writes them to `out`, returns
    the answer's header."""
    sock = _connect(path)
    try:
        sock.settimeout(timeout)
        header, reader = _first_answer(path, sock, cmd, args)
        remaining = int(header["length"])
        while remaining:
            chunk = reader.read(min(remaining, ByteStream.CHUNK))
            if not chunk:
                raise RequestError(f"daemon at {path} closed the connection {remaining} bytes short")
            out.write(chunk)
            remaining -= len(chunk)
        return header
    finally:
        sock.close()
