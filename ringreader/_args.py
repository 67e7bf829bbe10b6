"""Argument checks run before any pointer reaches C: C trusts its inputs, so these must not."""

from __future__ import annotations

import mmap
import operator
from typing import Any

import numpy as np
import numpy.typing as npt

from ._constants import MAX_RING_ENTRIES, U32_MASK, is_power_of_two
from ._shim import RingReaderError

RingBuffer = mmap.mmap | npt.NDArray[Any] | bytearray | memoryview
"""Anything exposing a writable, C-contiguous buffer: in production, the mmapped vCPU ring."""


def as_int(name: str, value: object, low: int, high: int) -> int:
    """value as an int in [low, high], or RingReaderError naming it and the allowed range."""
    if isinstance(value, bool):
        raise RingReaderError(f"{name} must be an integer, got a bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise RingReaderError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not low <= number <= high:
        raise RingReaderError(f"{name} must be in [{low}, {high}], got {number}")
    return number


def n_entries(value: object) -> int:
    number = as_int("n_entries", value, 1, MAX_RING_ENTRIES)
    if not is_power_of_two(number):
        raise RingReaderError(f"n_entries must be a power of two (KVM rings are), got {number}")
    return number


def fetch_index(value: object) -> int:
    return as_int("fetch_index", value, 0, U32_MASK)


def array(name: str, arr: object, dtype: type[np.generic], *, writable: bool) -> None:
    """arr must be a 1-D, C-contiguous numpy array of exactly dtype (native byte order)."""
    want = np.dtype(dtype)
    if not isinstance(arr, np.ndarray):
        raise RingReaderError(f"{name} must be a numpy array of {want.name}, got {type(arr).__name__}")
    if arr.dtype != want:
        raise RingReaderError(f"{name} must have dtype {want.name}, got {arr.dtype}")
    if arr.ndim != 1:
        raise RingReaderError(f"{name} must be 1-D, got {arr.ndim}-D")
    if not arr.flags.c_contiguous:
        raise RingReaderError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if writable and not arr.flags.writeable:
        raise RingReaderError(f"{name} must be writable")


def ring_buffer(ring: object, n: int, entry_size: int) -> None:
    """ring must be a writable, C-contiguous buffer of exactly n entries."""
    try:
        view = memoryview(ring)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:  # ValueError: a closed mmap
        raise RingReaderError(
            f"ring must be a writable buffer (mmap.mmap, numpy array, bytearray), got {type(ring).__name__}: {exc}"
        ) from None
    # Release at once: a lingering export would keep the caller from closing their mmap.
    with view:
        if view.readonly:
            raise RingReaderError("ring must be writable: harvesting stores RESET into flags")
        if not view.c_contiguous:
            raise RingReaderError("ring must be a C-contiguous buffer")
        if view.nbytes != n * entry_size:
            # Exact size: a wrong n_entries would wrap at the wrong place and skip entries.
            raise RingReaderError(
                f"ring is {view.nbytes} bytes, but n_entries={n} needs exactly "
                f"{n * entry_size} ({entry_size} bytes per entry)"
            )
