"""Accept loops that survive running out of file descriptors (DESIGN 6).

accept() fails with EMFILE/ENFILE (or ENOBUFS/ENOMEM) when the process or the system has no fd
or buffer left; the connection stays in the backlog. That is a state of the host, not an error
of this listener: back off (doubling, capped) and try again, so the daemon, its VMs and its
other sockets go on, and accept again once fds are free. One warning per episode, not one per
attempt, and one info line when it ends.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .logs import get_logger

T = TypeVar("T")

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# First retry soon (one connection closing frees an fd), then no busier than 10 attempts a second.
BACKOFF_FIRST_S = 0.01
BACKOFF_MAX_S = 0.1


async def accept_forever(
    accept: Callable[[], Awaitable[T]],
    serve: Callable[[T], Awaitable[None]],
    nursery: trio.Nursery,
    listener: str,
) -> None:
    """Run `serve(conn)` in `nursery` for each connection `accept()` returns, for ever."""
    log = get_logger(component="accept", listener=listener)
    backoff = 0.0
    failed = 0
    while True:
        try:
            conn = await accept()
        except OSError as err:
            if err.errno not in CAPACITY_ERRNOS:
                raise
            if failed == 0:
                log.warning("accept_out_of_resources", errno=errno.errorcode.get(err.errno or 0, "?"), error=str(err))
            failed += 1
            backoff = min(BACKOFF_MAX_S, backoff * 2 or BACKOFF_FIRST_S)
            await trio.sleep(backoff)
            continue
        if failed:
            log.info("accept_recovered", failed_attempts=failed)
            failed = 0
            backoff = 0.0
        nursery.start_soon(serve, conn)
