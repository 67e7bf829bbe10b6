"""Loads the compiled extension, checks its ABI, and turns its negative errnos into exceptions.

This is the one place where C return codes become Python exceptions.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from ._constants import DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET, DIRTY_GFN_SIZE

EXPECTED_ABI_VERSION = 3
"""Must equal RR_ABI_VERSION in ringreader.h; bump both together."""


class RingReaderError(ValueError):
    """A ringreader function was called with arguments it cannot use; the message says which."""


try:
    from ringreader._ringreader import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on how the package was built
    raise ImportError(
        "ringreader's C extension (ringreader._ringreader) is not built: install the package "
        "(pip install .) or build it in place with `python3 ringreader/_build.py` from the "
        "repository root"
    ) from exc

if lib.rr_abi_version() != EXPECTED_ABI_VERSION:  # pragma: no cover - stale build only
    raise ImportError(
        f"ringreader._ringreader was built with ABI version {lib.rr_abi_version()}, but this "
        f"wrapper needs {EXPECTED_ABI_VERSION}: the extension is stale, rebuild it"
    )

_compiled = (lib.RR_DIRTY_GFN_F_DIRTY, lib.RR_DIRTY_GFN_F_RESET, ffi.sizeof("struct rr_dirty_gfn"))
if _compiled != (DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET, DIRTY_GFN_SIZE):  # pragma: no cover
    raise ImportError(f"ringreader._ringreader disagrees on the ring layout: {_compiled}")

_MEANING = {
    errno.EINVAL: "invalid argument (n_entries must be a nonzero power of two)",
    errno.ERANGE: "an entry is outside the tracked memslots",
    errno.ENOSPC: "the output array is too small",
}


def check_ring_aligned(c_ring: object) -> None:
    """A ring's entries must be 8-byte aligned: the C reads and writes their flags as atomics,
    and a misaligned atomic is undefined behaviour."""
    if int(ffi.cast("uintptr_t", c_ring)) % 8:
        raise RingReaderError("ring buffer must be 8-byte aligned")


def check(rc: int, op: str, detail: Callable[[], str] | None = None) -> int:
    """Return rc if it is a count; raise RingReaderError naming op if it is a negative errno.

    detail, when given, is called only on failure to describe the offending input.
    """
    if rc >= 0:
        return rc
    code = -rc
    meaning = _MEANING.get(code, os.strerror(code))
    extra = f": {detail()}" if detail is not None else ""
    raise RingReaderError(f"{op} failed with {errno.errorcode.get(code, code)}, {meaning}{extra}")


__all__ = ["EXPECTED_ABI_VERSION", "RingReaderError", "check", "check_ring_aligned", "ffi", "lib"]
