#!/usr/bin/env python3
"""Coverage-guided fuzzing of the control-socket parser (migrated/control_request.py).

    .venv/bin/python fuzz/fuzz_control.py -runs=1000000 [CORPUS_DIR ...]

Takes libFuzzer's arguments (-runs=N, -max_len=N, -timeout=S, corpus directories). The property
checked for every input: `parse_request` either returns a ControlRequest whose command is a
short name and whose args are a dict, or raises RequestRefused with a message; any other
exception (ValueError, RecursionError, ...) is a crash and stops the run with the input saved.
"""

from __future__ import annotations

import json
import sys

import atheris
from seeded import fuzz_from_seeds

with atheris.instrument_imports():
    from migrated.control_request import (
        MAX_COMMAND_CHARS,
        ControlRequest,
        RequestRefused,
        parse_request,
    )

# Seeds that reach deep into the decoder at once: valid requests, then the inputs that once
# ended the daemon (issue 10).
SEEDS = [
    b'{"cmd": "vm.list"}',
    b'{"cmd": "vm.create", "args": {"name": "web", "memory_mib": 64, "dirty_rate_mib_s": NaN}}',
    b'{"cmd": "vm.show", "args": {"name": "a\\"b"}}',
    b"1" * 5000,
    b"[" * 100_000,
]


def test_one_input(data: bytes) -> None:
    try:
        request = parse_request(data)
    except RequestRefused as err:
        if not str(err):
            raise AssertionError("a refusal without a message") from err
        return
    if not isinstance(request, ControlRequest) or not isinstance(request.args, dict):
        raise AssertionError(f"parse_request returned {request!r}")
    if not 0 < len(request.cmd) <= MAX_COMMAND_CHARS:
        raise AssertionError(f"command {request.cmd!r} passed the bound")
    json.dumps(request.args)  # what the handlers get must be plain JSON again


def main() -> None:
    fuzz_from_seeds(sys.argv, SEEDS, test_one_input, "fuzz_control")


if __name__ == "__main__":
    main()
