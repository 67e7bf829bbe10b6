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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .logs import get_logger
from .socket_access import restrict_control_socket

# A request is a command name and a few arguments: 1 MiB is far more than any needs, and it
# bounds what a confused client can make the daemon buffer.
MAX_REQUEST_BYTES = 1 << 20

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
    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_serve_connection, trio.SocketStream(conn), handler)
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
                await _send(stream, await _answer(line, handler, log))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _answer(line: bytes, handler: Handler, log: Any) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return {"ok": False, "error": f"request is not JSON: {err}"}
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        return {"ok": False, "error": 'request must be a JSON object with a string "cmd"'}
    args = request.get("args", {})
    if not isinstance(args, dict):
        return {"ok": False, "error": '"args" must be a JSON object'}
    cmd = request["cmd"]
    try:
        return {"ok": True, "result": await handler(cmd, args)}
    except RequestError as err:
        log.info("control_request_refused", cmd=cmd, error=str(err))
        return {"ok": False, "error": str(err)}
    except Exception as err:  # one failed request must not take the daemon down
        log.exception("control_request_failed", cmd=cmd)
        return {"ok": False, "error": f"{cmd} failed: {type(err).__name__}: {err}"}


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message, default=str).encode() + b"\n")


def request(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Blocking client call (for migratectl): returns the result or raises RequestError."""
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        try:
            # Blocking connect: with a timeout set, a full listen backlog fails at once (EAGAIN)
            # instead of waiting for the daemon to accept.
            sock.connect(str(path))
        except FileNotFoundError:
            raise RequestError(f"no daemon at {path}: the control socket does not exist") from None
        except ConnectionRefusedError:
            raise RequestError(f"no daemon at {path}: connection refused") from None
        except PermissionError:
            raise RequestError(
                f"no permission to use {path}: run as root, or as a member of the group the "
                "daemon's daemon.control_socket_group names"
            ) from None
        sock.settimeout(timeout)
        sock.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise RequestError(f"daemon at {path} closed the connection without an answer")
            data += chunk
    finally:
        sock.close()
    answer = json.loads(data)
    if not answer.get("ok"):
        raise RequestError(answer.get("error", "unknown error"))
    return answer.get("result")
