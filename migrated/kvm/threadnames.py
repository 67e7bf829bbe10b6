"""Kernel names for the daemon's long-lived threads, so that `top -H`, `ps -L`, perf and
/proc/PID/task/TID/comm tell a VM's vCPUs and harvester from the rest.

Python's thread names stay inside Python. The kernel's (15 bytes) is inherited from the thread
that started the new one, so every vCPU and harvester started from a worker thread showed as that
worker ("create_local fr"), and a profile blamed the worker for their CPU.
"""

from __future__ import annotations

import ctypes

_PR_SET_NAME = 15  # <linux/prctl.h>
_COMM_BYTES = 15  # TASK_COMM_LEN 16, with its NUL
_libc = ctypes.CDLL(None, use_errno=True)


def kernel_name(vm: str, role: str) -> str:
    """`vm-role` in at most 15 bytes: the role whole (it says what the thread does), the VM's
    name cut to fit."""
    suffix = f"-{role}".encode()[:_COMM_BYTES]
    room = _COMM_BYTES - len(suffix)
    return (vm.encode()[:room] + suffix).decode(errors="ignore")


def name_this_thread(name: str) -> None:
    """Best effort: a name is for people reading the process, so a failure changes nothing."""
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:_COMM_BYTES]), 0, 0, 0)
