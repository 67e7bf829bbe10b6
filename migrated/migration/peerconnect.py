"""The connection to a peer's listener, TCP then TLS when configured: the stream that a
migration's link (outgoing_setup.py), a query (indoubt.py) and a warm link (warmlinks.py) speak
the protocol over."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

import trio

from .. import tls
from ..config import PeerConfig
from ..peer import PeerError


def _nothing() -> None:
    pass


async def connect_stream(
    host: str, port: int, peer: PeerConfig, on_connected: Callable[[], None] = _nothing
) -> trio.abc.Stream:
    """Under the caller's deadline; PeerError naming what failed. `on_connected`: called once
    TCP is up (the setup's timeline)."""
    try:
        raw = await trio.open_tcp_stream(host, port)
    except OSError as err:
        raise PeerError(f"cannot connect to the peer {host}:{port}: {connect_failure(err)}") from err
    on_connected()
    if peer.auth != "tls":
        return raw
    try:
        return await tls.wrap_client(raw, peer, host)
    except (ssl.SSLError, trio.BrokenResourceError) as err:
        await trio.aclose_forcefully(raw)
        raise PeerError(f"TLS handshake with the peer failed: {err}") from err
    except BaseException:
        await trio.aclose_forcefully(raw)
        raise


def connect_failure(err: OSError) -> str:
    """The cause of a failed connect, without the errno noise: "Name or service not known" for
    a host name that does not resolve; for refused or unreachable addresses (which trio reports
    as "all attempts to connect to ... failed"), the first attempt's reason."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
            continue
        if isinstance(cause, OSError) and cause.strerror:
            # trio's own message repeats the address; the errno's text is the reason alone.
            code = cause.errno
            return os.strerror(code) if isinstance(code, int) and code > 0 else str(cause.strerror)
        cause = cause.__cause__
    return str(err) or type(err).__name__
