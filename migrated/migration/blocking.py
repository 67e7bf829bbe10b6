"""Data-stream sockets that block in the kernel for a whole record, bounded by kernel timeouts.

A socket with a Python timeout is non-blocking underneath: each send or receive is a poll and
then the call, repeated as often as the socket buffer fills or drains within a record, and each
of these gives up the GIL and takes it back. Taking it back waits for whichever thread holds it
(up to the interpreter's switch interval, 5 ms, behind one that runs Python code), and a daemon
has several: vCPU exits, the ring harvester every millisecond, the event loop. Blocking in the
kernel instead (`sendmsg` until all of it is queued, `recv_into` with MSG_WAITALL until the
record is in), a record costs one call and one GIL hand-over per side.

The link's deadline stays: SO_SNDTIMEO and SO_RCVTIMEO bound each call. A call that moved some
bytes before the deadline returns what it moved (the caller goes on with the rest); one that
moved nothing fails with EAGAIN (`is_timeout`), as the Python timeout raised TimeoutError. TLS
sockets keep their Python timeout (the ssl module reads and writes in records of its own).
"""

from __future__ import annotations

import errno
import math
import socket
import ssl
import struct

_TIMEVAL = struct.Struct("@ll")


def block_with_deadline(sock: socket.socket, timeout_s: float) -> None:
    """Blocking calls, each bounded by `timeout_s` (inf or 0: unbounded) in the kernel."""
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(timeout_s if 0 < timeout_s < math.inf else None)
        return
    sock.settimeout(None)
    if 0 < timeout_s < math.inf:
        seconds = int(timeout_s)
        micros = round((timeout_s - seconds) * 1e6) or (0 if seconds else 1)  # (0, 0) would mean no bound
        timeval = _TIMEVAL.pack(seconds, micros)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)


def deadline_s(sock: socket.socket) -> float:
    """The bound of each call set by `block_with_deadline` (inf: none), for messages."""
    timeout = sock.gettimeout()
    if timeout is not None:
        return timeout
    seconds, micros = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.size))
    return seconds + micros / 1e6 if seconds or micros else math.inf


def is_timeout(err: OSError) -> bool:
    """A call that ran into its kernel deadline (EAGAIN) or the Python timeout (TLS)."""
    return isinstance(err, TimeoutError) or err.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
