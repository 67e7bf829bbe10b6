"""One control-socket line -> a checked request, or one clear error (DESIGN 6).

Rules of this file:

- Pure: bytes in, a `ControlRequest` or `RequestRefused` out; no I/O, no logging, no trio. The
  fuzzer (`fuzz/fuzz_control.py`) and the property tests call `parse_request` exactly as the
  control server does.
- Every bound is checked before the JSON decoder sees the text: the decoder recurses per nesting
  level (100,000 `[` raise RecursionError) and `int()` refuses more than 4,300 digits with a
  ValueError; neither may ever escape. Only `RequestRefused` leaves this module.
- NaN and Infinity stay parseable: the handlers name such a value in their own errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

# A request is a command name and a few arguments: 1 MiB is far more than any needs, and it
# bounds what a confused client can make the daemon buffer.
MAX_REQUEST_BYTES = 1 << 20
# The deepest request (vm.create) is two levels deep; 32 leaves room for any future argument and
# stays far below the interpreter's recursion limit, which the decoder would otherwise hit.
MAX_DEPTH = 32
# 2**64 has 20 digits; nothing a handler takes is larger, and a long integer costs quadratic time.
MAX_INTEGER_DIGITS = 32
# Command names are short dotted words ("vm.create", "migration.status").
MAX_COMMAND_CHARS = 64

# A string, or what is left of an unterminated one ("unrolled loop" form): every opening quote
# matches without backtracking, so the scan stays linear even on a line of escapes.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)', re.DOTALL)
# +1 for an opening bracket, -1 for a closing one, 0 for every other byte.
_NESTING = np.zeros(256, dtype=np.int8)
_NESTING[list(b"[{")] = 1
_NESTING[list(b"]}")] = -1
_INTEGER_RUN = re.compile(rb"[0-9]{%d,}" % (MAX_INTEGER_DIGITS + 1))
_COMMAND = re.compile(r"[a-z][a-z0-9_.-]*")


class RequestRefused(ValueError):
    """The line is no acceptable request; the message goes back to the client as is."""


@dataclass(frozen=True, slots=True)
class ControlRequest:
    cmd: str
    args: dict[str, Any]


def parse_request(line: bytes) -> ControlRequest:
    """Check `line` (one request, without its newline) against every bound, then decode it."""
    if len(line) > MAX_REQUEST_BYTES:
        raise RequestRefused("request longer than 1 MiB")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestRefused(f"request is not JSON: not UTF-8 at byte {err.start}") from None
    # Brackets and digits inside strings are text, not structure: blank the strings out first
    # (same length, so positions in errors stay true).
    structure = _STRING.sub(b'""', line)
    depth = _max_depth(structure)
    if depth > MAX_DEPTH:
        raise RequestRefused(f"request is not acceptable: nested {depth} levels deep, more than {MAX_DEPTH}")
    if _INTEGER_RUN.search(structure) is not None:
        raise RequestRefused(f"request is not acceptable: a number of more than {MAX_INTEGER_DIGITS} digits")
    try:
        request = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestRefused(f"request is not JSON: {err}") from None
    except (ValueError, RecursionError) as err:  # the bounds above should make this unreachable
        raise RequestRefused(f"request is not acceptable: {type(err).__name__}") from None
    return _check_shape(request)


def _max_depth(structure: bytes) -> int:
    """The deepest nesting the decoder would reach; vectorised, as a 1 MiB line may be all brackets."""
    if not structure:
        return 0
    steps = _NESTING[np.frombuffer(structure, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _check_shape(request: Any) -> ControlRequest:
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise RequestRefused('request must be a JSON object with a string "cmd"')
    unknown = sorted(set(request) - {"cmd", "args"})
    if unknown:
        raise RequestRefused(f"request has unknown keys {unknown[:8]}; allowed are cmd, args")
    cmd = request["cmd"]
    if len(cmd) > MAX_COMMAND_CHARS or not _COMMAND.fullmatch(cmd):
        raise RequestRefused(
            f"command {cmd[:MAX_COMMAND_CHARS]!r}: a name of lowercase letters, digits, '.', '_' "
            f"and '-', at most {MAX_COMMAND_CHARS} characters"
        )
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise RequestRefused('"args" must be a JSON object')
    return ControlRequest(cmd, args)
