"""Accept loops out of fds (migrated/accepting.py) and the control server's answer to a handler
that crashes (migrated/control.py), in process: trio's MockClock jumps the back-off, so no test
here waits for wall-clock time."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from migrated.accepting import BACKOFF_MAX_S, accept_forever
from migrated.control import serve_control
from migrated.logs import get_logger

# Configure structlog now: a first get_logger() inside capture_logs() would replace the capture.
get_logger()


def test_emfile_is_backed_off_logged_once_and_accepting_goes_on() -> None:
    failures = [errno.EMFILE] * 50 + [errno.ENFILE] * 5
    served: list[int] = []
    attempts_at: list[float] = []

    accepted = 0

    async def accept() -> int:
        nonlocal accepted
        await trio.lowlevel.checkpoint()  # as a real accept() does
        attempts_at.append(trio.current_time())
        if failures:
            raise OSError(failures.pop(0), "Too many open files")
        if accepted == 3:
            await trio.sleep_forever()
        accepted += 1
        return accepted - 1

    async def serve(conn: int) -> None:
        served.append(conn)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_forever, accept, serve, nursery, "test")
            while len(served) < 3:
                await trio.sleep(1)
            nursery.cancel_scope.cancel()

    with structlog.testing.capture_logs() as logs:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert served == [0, 1, 2]
    gaps = [b - a for a, b in zip(attempts_at, attempts_at[1:56])]
    assert all(0 < gap <= BACKOFF_MAX_S + 1e-9 for gap in gaps), gaps  # backed off, never busy
    assert gaps[-1] == pytest.approx(BACKOFF_MAX_S)
    events = [entry["event"] for entry in logs]
    assert events == ["accept_out_of_resources", "accept_recovered"], logs
    assert logs[1]["failed_attempts"] == 55


def test_other_accept_errors_are_not_swallowed() -> None:
    async def accept() -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    async def serve(conn: int) -> None:
        raise AssertionError("nothing was accepted")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await accept_forever(accept, serve, nursery, "test")

    with pytest.raises(BaseExceptionGroup) as raised:
        trio.run(main)
    assert raised.group_contains(OSError, match="Bad file descriptor")


def test_a_handler_that_crashes_gets_an_internal_error_and_the_server_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "boom":
            raise RecursionError("maximum recursion depth exceeded")
        return {"echo": args}

    async def client(lines: bytes) -> list[dict[str, Any]]:
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(lines)
            received = b""
            while received.count(b"\n") < lines.count(b"\n"):
                chunk = await stream.receive_some(65536)
                assert chunk, f"the server closed after {received!r}"
                received += chunk
        return [json.loads(line) for line in received.splitlines()]

    async def main() -> list[dict[str, Any]]:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, handler)
            answers = await client(b'{"cmd": "boom", "args": {"x": 1}}\n{"cmd": "echo", "args": {"y": 2}}\n')
            answers += await client(b'{"cmd": "echo"}\n')
            nursery.cancel_scope.cancel()
        return answers

    with structlog.testing.capture_logs() as logs:
        answers = trio.run(main)
    assert answers[0] == {
        "ok": False,
        "error": "boom failed: internal error: RecursionError: maximum recursion depth exceeded",
    }
    assert answers[1:] == [{"ok": True, "result": {"echo": {"y": 2}}}, {"ok": True, "result": {"echo": {}}}]
    failed = [entry for entry in logs if entry["event"] == "control_request_failed"]
    assert len(failed) == 1 and failed[0]["cmd"] == "boom", logs
