"""Data-stream sockets that block in the kernel for a whole record, bounded by kernel timeouts.

A socket with a Python timeout is non-blocking underneath: each send or receive is a poll and
then the call, repeated as often as the socket buffer fills or drains within a record, and each
of these gives up the GIL and takes it back. Taking it back waits for whichever thread holds it
(up to the interpreter's switch interval, 5 ms, behind one that runs Python code), and a daemon
has several: vCPU exits, the ring harvester every millisecond, the event loop. Blocking in the
kernel instead (`sendmsg` until all of it is queued; on the receiving side a `poll` until the
whole record is queued, then one `recv_into`: `RecordReads`), a record costs one call and one
GIL hand-over per side.

The link's deadline stays: SO_SNDTIMEO and SO_RCVTIMEO bound each call (`RecordReads` gives its
poll the same bound). A call that moved some bytes before the deadline returns what it moved (the
caller goes on with the rest); one that moved nothing fails with EAGAIN (`is_timeout`), as the
Python timeout raised TimeoutError. TLS sockets keep their Python timeout (the ssl module reads
and writes in records of its own).
"""

from __future__ import annotations

import errno
import math
import select
import socket
import ssl
import struct
import time

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


class RecordReads:
    """Receives on a blocking TCP socket into the buffer in hand, woken once it can all be read.

    Before each receive the socket's SO_RCVLOWAT is set to the buffer's size (when it changed),
    and `poll` waits for the kernel to say that much is queued; the receive then takes it without
    waiting (MSG_DONTWAIT). MSG_WAITALL alone woke the receive thread for every segment: 25-57
    wake-ups of a few microseconds' work per 4 MiB record here (2-3 this way), each taking a
    core from the sender beside it. A thread asleep with a low-water mark above what is still to come would never
    wake, which is why the mark is never above what the buffer in hand lacks: a reader woken
    short of it (the kernel also wakes it when its receive window closes or its buffer is under
    pressure, and caps the mark at half its largest receive buffer) gets what is there, and the
    next call asks only for the rest.

    The deadline keeps `block_with_deadline`'s meaning: a receive that waited `timeout_s` returns
    what arrived by then, or fails with EAGAIN (`is_timeout`) if nothing did."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._timeout_s = timeout_s if 0 < timeout_s < math.inf else None
        self._low_water = 1  # the kernel's default

    def recv_into(self, buffer: memoryview) -> int:
        """Bytes received into `buffer` (0: the peer closed), at most its size."""
        wanted = buffer.nbytes
        if wanted != self._low_water:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
            self._low_water = wanted
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        while True:
            wait_ms = -1 if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1e3))
            ready = self._poll.poll(wait_ms)
            try:
                return self._sock.recv_into(buffer, wanted, socket.MSG_DONTWAIT)
            except BlockingIOError:
                # Nothing queued: a poll that timed out is the deadline; one that said "ready"
                # with nothing to read waits again.
                if not ready and deadline is not None and time.monotonic() >= deadline:
                    raise
