"""libc calls the standard library does not offer with 64-bit arguments.

`fcntl.ioctl` passes its argument as a C int (addresses above 2**31 overflow it) and copies
buffers; ioctl and mmap here go through ctypes so pointers stay 64-bit and the memory the
kernel reads or writes stays referenced for the whole call.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)

_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int

MAP_FAILED = ctypes.c_void_p(-1).value
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_NORESERVE = 0x4000
MADV_REMOVE = 9


def ioctl(fd: int, request: int, arg: Any = 0) -> int:
    """ioctl(2) returning its non-negative result, or raising OSError with errno.

    `arg` is an int (passed by value) or a ctypes object (passed by reference).
    """
    if isinstance(arg, int):
        ptr: Any = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.cast(ctypes.byref(arg), ctypes.c_void_p)
    result = _libc.ioctl(fd, request, ptr)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def mmap(length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    address = _libc.mmap(None, length, prot, flags, fd, offset)
    if address is None or address == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(address)


def madvise(address: int, length: int, advice: int) -> None:
    if _libc.madvise(address, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def munmap(address: int, length: int) -> None:
    if _libc.munmap(address, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
