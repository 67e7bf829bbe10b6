"""sd_notify(3): tell systemd we are ready, reloading, stopping or alive. No dependency.

The protocol is one datagram of newline-separated VAR=value lines to the AF_UNIX socket named in
$NOTIFY_SOCKET (a leading "@" means the abstract namespace). Outside systemd the variable is
absent and every call does nothing, so the daemon calls these unconditionally.

A failed notification must never stop the daemon: errors go to `on_error` (the caller logs them)
and the call returns. Sends time out after `SEND_TIMEOUT_S`, because a wedged systemd must not
block the event loop for long either; the datagram is then lost and reported.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier"]

SEND_TIMEOUT_S = 1.0

ErrorHandler = Callable[[OSError], None]


def _ignore(err: OSError) -> None:
    pass


class Notifier:
    """Sends state changes to systemd's notify socket; a no-op when there is none."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
        on_error: ErrorHandler = _ignore,
    ) -> None:
        self.address = address or None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._on_error = on_error
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, on_error: ErrorHandler = _ignore) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=env.get("WATCHDOG_USEC"),
            watchdog_pid=env.get("WATCHDOG_PID"),
            on_error=on_error,
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self) -> None:
        """Call once everything the daemon serves is listening (Type=notify waits for this)."""
        self.notify("READY=1")

    def status(self, text: str) -> None:
        """One line for `systemctl status`."""
        self.notify("STATUS=" + text.replace("\n", " "))

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def reloading(self) -> None:
        """Call on SIGHUP before re-reading the configuration, and `ready()` when done.

        systemd's Type=notify-reload convention: RELOADING=1 with the CLOCK_MONOTONIC time in
        microseconds, so systemd can tell this reload from an earlier one.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> None:
        """Call every `watchdog_interval_s()`, and only when the daemon is known to be healthy."""
        self.notify("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """Half of WATCHDOG_USEC (sd_watchdog_enabled(3) advises pinging at half the timeout).

        None when the watchdog is off, or when WATCHDOG_PID names another process (the variables
        were inherited from a parent that systemd watches).
        """
        if self._watchdog_pid is not None:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec or "")
        except ValueError:
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None

    def notify(self, *fields: str) -> None:
        """Send `fields` (VAR=value each) in one datagram; a no-op outside systemd."""
        if self.address is None:
            return
        try:
            self._socket().sendto("\n".join(fields).encode(), self._sockaddr())
        except OSError as err:
            self._on_error(err)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _sockaddr(self) -> bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + os.fsencode(self.address[1:])
        if self.address.startswith("/"):
            return os.fsencode(self.address)
        # systemd >= 253 may also hand out vsock:... for VMs; we only ever run on the host.
        raise OSError(errno.EAFNOSUPPORT, f"unsupported NOTIFY_SOCKET address {self.address!r}")

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(SEND_TIMEOUT_S)
            self._sock = sock
        return self._sock
