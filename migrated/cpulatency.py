"""Idle CPUs that poll instead of sleeping, while a downtime runs: a PM QoS CPU latency request of
0 us (/dev/cpu_dma_latency, Documentation/power/pm_qos_interface.rst), made by writing 0 to the
device and dropped by writing PM_QOS_DEFAULT_VALUE (-1) back. The request lives as long as the
open file: a daemon that dies drops it with its fds.

Why: a downtime is a chain of wake-ups (the pause, every message between the daemons, each
thread that takes a step), and a thread woken on an idle CPU first waits for that CPU to leave
its idle state. On this project's hosts, guests themselves with the cpuidle driver haltpoll and
no halt polling (guest_halt_poll_ns=0 on the kernel command line), a CPU that went idle waits
for its own host to run it again: a Python thread-to-thread round trip took 48-58 us, 9 us with
the request held; a round trip between two processes 25-33 us, 19-22 us (quiet machine). While
held, idle CPUs spin in the kernel's poll loop (they still run any thread at once): a cost in
power or, on a guest, in its host's CPU time, for as long as a downtime window is open
(window.py: from the source's last drain to RUNNING; on a target from its streams' end on).

Counted: windows of several migrations overlap, and the request is dropped when the last closes.
A daemon that cannot open the device (not root, or a systemd unit without `DeviceAllow=` for it)
runs without it and says so (the start-up warning `cpu_latency_unavailable`, `daemon.status`).
"""

from __future__ import annotations

import os
import struct
import threading

DEVICE = "/dev/cpu_dma_latency"
_HOLD = struct.pack("=i", 0)  # no idle state with an exit latency above 0 us: poll
_DROP = struct.pack("=i", -1)  # PM_QOS_DEFAULT_VALUE: this request no longer constrains
FIX = (
    "run the daemon as root with the device reachable (the unit's DeviceAllow=/dev/cpu_dma_latency), "
    "or set migration.downtime_idle_polling = false"
)


class CpuLatency:
    """The process's one request; `open` once at start-up, then `hold` / `release` in pairs."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._holds = 0
        self._lock = threading.Lock()
        self.error: str | None = "not opened"  # why holding does nothing (None: it works)

    def open(self, path: str = DEVICE) -> str | None:
        """Open the device (a request that does not constrain yet); returns why not, or None."""
        with self._lock:
            if self._fd is not None:
                return None
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as err:
                self.error = f"{path}: {err.strerror} (errno {err.errno})"
                return self.error
            self._fd, self.error = fd, None
            return None

    @property
    def held(self) -> bool:
        return self._fd is not None and self._holds > 0

    def hold(self) -> None:
        with self._lock:
            self._holds += 1
            if self._holds == 1:
                self._write(_HOLD)

    def release(self) -> None:
        with self._lock:
            if self._holds == 0:
                return
            self._holds -= 1
            if self._holds == 0:
                self._write(_DROP)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._holds, self.error = None, 0, "not opened"

    def _write(self, value: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, value)
        except OSError as err:  # the kernel accepts any s32; nothing a downtime should fail on
            self.error = f"{DEVICE}: {err.strerror} (errno {err.errno})"


CPU_LATENCY = CpuLatency()
