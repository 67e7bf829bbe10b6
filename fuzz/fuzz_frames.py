"""Coverage-guided fuzzing of frame decoding (atheris, libFuzzer): python fuzz/fuzz_frames.py [libFuzzer args]

Harness convention (every fuzz/fuzz_*.py): a script that takes libFuzzer's own arguments
(-runs=N, -max_len=N, -seed=N, corpus directories...) and passes them to atheris; given no corpus
directory it starts from seeds of its own (valid inputs written to a temporary directory).
`make fuzz` runs each one to FUZZ_RUNS inputs; tests/fuzz runs each for a bounded count.

What runs: the first input byte picks a scenario, the rest is what the peer sent.
  0  framing.decode_header and build_event on a raw frame
  1  the target in START, frames in the clear
  2  the target in PAGES, frames in the clear (tls: the edge's TLS protects them)
  3  the source in LOADING, frames in the clear
  4  the target in PAGES with a psk: the input is cut into frames and each sealed by the source,
     so the frame decoder behind the record layer is reached
  5  the target in PAGES with a psk: the input as raw bytes on the sealed stream
Only the protocol's own errors may escape; a PageBatch that comes out must lie inside the VM's
layout and applying it to RAM of exactly that layout must work; buffers stay bounded.
"""

from __future__ import annotations

import copy
import functools
import struct
import sys
from collections.abc import Callable

import atheris
from seeded import fuzz_from_seeds

with atheris.instrument_imports(include=["transport"]):
    import msgpack
    import numpy as np

    from transport import (
        NEED_DATA,
        Accept,
        Connection,
        DeviceState,
        Done,
        Event,
        PageBatch,
        ProtocolError,
        Role,
        VmDescription,
        framing,
        limits,
    )

KEY = bytes(range(32))
PAGE = 4096
LAYOUT = {0: 64, 1: 16}
NONCES = {Role.SOURCE: b"s" * 32, Role.TARGET: b"t" * 32}
DESCRIPTION = VmDescription(
    name="vm1",
    migration_id="fuzz-0001",
    memory=((0, 0, LAYOUT[0] * PAGE), (1, 1 << 32, LAYOUT[1] * PAGE)),
    vcpus=1,
    guest_kind="workload",
    cpu_features={},
    dirty_tracking="ring",
)


def _exchange(sender: Connection, receiver: Connection, event: Event) -> None:
    receiver.receive_data(sender.send(event))
    while receiver.next_event() is not NEED_DATA:
        pass


def _pair(psk: bool) -> tuple[Connection, Connection]:
    auth = {"psk": KEY} if psk else {"tls": True}
    source = Connection(Role.SOURCE, node="a", **auth)
    target = Connection(Role.TARGET, node="b", **auth)
    _exchange(source, target, source.make_hello(NONCES[Role.SOURCE]))
    _exchange(target, source, target.make_hello(NONCES[Role.TARGET]))
    if psk:
        _exchange(source, target, source.make_auth())
        _exchange(target, source, target.make_auth())
    return source, target


def _in_pages(psk: bool) -> tuple[Connection, Connection]:
    source, target = _pair(psk)
    _exchange(source, target, DESCRIPTION)
    _exchange(target, source, Accept())
    return source, target


def _target_start() -> Connection:
    return Connection(Role.TARGET, node="b", tls=True)


def _check_batch(batch: PageBatch) -> None:
    """Applying the batch to RAM of exactly the layout: an index outside raises IndexError."""
    pages = LAYOUT[batch.slot]
    ram = np.zeros((pages, 8), np.uint8)  # 8 bytes stand for a page: the indices are the point
    assert batch.data_bytes == batch.pages.size * PAGE
    ram[batch.pages.astype(np.intp)] = 1
    ram[batch.zero_pages.astype(np.intp)] = 0


def _buffered(conn: Connection) -> int:
    opener = conn._opener
    return len(conn._buf) - conn._pos + (opener.buffered if opener is not None else 0)


def _feed(conn: Connection, data: bytes, step: int) -> None:
    try:
        for start in range(0, len(data), step):
            conn.receive_data(data[start : start + step])
            assert _buffered(conn) <= limits.RECEIVE_BUFFER_LIMIT
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, PageBatch):
                    _check_batch(event)
        conn.receive_data(b"")
        conn.next_event()
    except ProtocolError:
        pass


def _frames(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        if len(data) - pos < framing.PREFIX.size:
            out.append(data[pos:])
            break
        header_len, payload_len = framing.PREFIX.unpack_from(data, pos)
        end = min(len(data), pos + framing.PREFIX.size + header_len + payload_len)
        out.append(data[pos:end])
        pos = end
    return out


def _decode_only(data: bytes) -> None:
    try:
        if len(data) < framing.PREFIX.size:
            return
        header_len, payload_len = framing.PREFIX.unpack_from(data)
        framing.check_prefix(header_len, payload_len)
        raw = data[framing.PREFIX.size : framing.PREFIX.size + header_len]
        wire, fields = framing.decode_header(raw)
        payload = bytearray(data[framing.PREFIX.size + header_len :])
        framing.build_event(wire, fields, payload)
    except ProtocolError:
        pass


def _sealed(data: bytes, step: int) -> None:
    source, target = _fresh("sealed")
    sealer = source.sealer
    assert sealer is not None
    wire = b"".join(b"".join(bytes(p) for p in sealer.seal([frame])) for frame in _frames(data))
    _feed(target, wire, step)


@functools.cache
def _pristine(name: str) -> tuple[Connection, Connection]:
    """(source, target) in the scenario's state, built once; each input gets a deep copy."""
    if name == "pages":
        return _in_pages(False)
    if name == "sealed":
        return _in_pages(True)
    source, target = _in_pages(False)
    _exchange(source, target, DeviceState("vcpu0", b"regs"))
    _exchange(source, target, Done(0, b"d" * 32, "full"))
    return source, target


def _fresh(name: str) -> tuple[Connection, Connection]:
    pair = _pristine(name)
    # An AESGCM context holds only its key and cannot be copied: the copies share it.
    memo: dict[int, object] = {}
    for conn in pair:
        for keeper in (conn._opener, conn._sealer):
            if keeper is not None:
                memo[id(keeper._aead)] = keeper._aead
    return copy.deepcopy(pair, memo)


SCENARIOS: list[Callable[[bytes, int], None]] = [
    lambda data, step: _decode_only(data),
    lambda data, step: _feed(_target_start(), data, step),
    lambda data, step: _feed(_fresh("pages")[1], data, step),
    lambda data, step: _feed(_fresh("loading")[0], data, step),
    _sealed,
    lambda data, step: _feed(_fresh("sealed")[1], data, step),
]


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    scenario = SCENARIOS[data[0] % len(SCENARIOS)]
    body = data[2:]
    # Byte-by-byte feeding finds resumption bugs; at most 64 pieces keeps an input cheap.
    step = max((1, 3, 17, 4096, 1 << 20)[data[1] % 5], len(body) // 64)
    scenario(body, step)


def _frame(header: dict[str, object], payload: bytes = b"") -> bytes:
    body = msgpack.packb(header, use_bin_type=True)
    return framing.PREFIX.pack(len(body), len(payload)) + body + payload


def _seeds() -> list[bytes]:
    batch = _frame(
        {"t": "page_batch", "slot": 0, "round": 1, "n_pages": 1, "n_zero": 1},
        struct.pack("<QQ", 3, 4) + bytes(PAGE),
    )
    hello = _frame(
        {
            "t": "hello",
            "version_min": 2,
            "version_max": 2,
            "node": "x",
            "nonce": b"n" * 32,
            "auth": "tls",
            "capabilities": [],
            "max_batch_bytes": 8 << 20,
        }
    )
    done = _frame({"t": "done", "pages_total": 2, "digest": b"d" * 32, "verify": "full"})
    loaded = _frame({"t": "loaded", "digest": b"d" * 32})
    state = _frame({"t": "device_state", "kind": "vcpu0"}, b"regs")
    return [
        bytes([0, 4]) + batch,
        bytes([1, 4]) + hello,
        bytes([2, 3]) + batch + state + done,
        bytes([3, 2]) + loaded,
        bytes([4, 4]) + batch + state + done,
        bytes([5, 1]) + batch,
    ]


def main(argv: list[str]) -> None:
    fuzz_from_seeds(argv, _seeds(), test_one_input, "fuzz_frames", check_seeds=False)


if __name__ == "__main__":
    main(sys.argv)
