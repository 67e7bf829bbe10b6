"""The target daemon B that tests/migration/test_hostile_peers.py attacks, a watch on its log,
and a hand-driven peer that builds frames a real source never would."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]
import numpy as np

from daemons import DaemonProcess, heartbeat, wait_for
from migrated.hosted import VmSpec
from transport import (
    NEED_DATA,
    Accept,
    Auth,
    Connection,
    Event,
    Hello,
    PageBatch,
    Role,
    State,
    VmDescription,
)
from transport import framing, limits

MIB = 1 << 20
PAGE = 4096
VM_MIB = 64
SLOT_PAGES = VM_MIB * MIB // PAGE
SMALL_VM: dict[str, Any] = {"memory_mib": VM_MIB, "vcpus": 1, "working_set_mib": 8, "dirty_rate_mib_s": 10}
BYSTANDER = "bystander"
# B drops a peer that makes no progress for this long (peer.connect_timeout_s): short, so that
# a peer that goes silent costs the test seconds, not the default ten.
B_TIMEOUT_S = 2


@dataclass
class TargetHost:
    daemon: DaemonProcess
    key: bytes
    cpu: dict[str, Any]  # vmstate.cpu_features of this host: what a compatible source sends


def vm_names(daemon: DaemonProcess) -> list[str]:
    return [vm["name"] for vm in daemon.call("vm.list")]


def assert_unharmed(target: TargetHost) -> None:
    """B is alive and answers; the bystander runs, its heartbeat rising, with no verification
    error; no other VM exists on B (an incoming copy is discarded within moments)."""
    daemon = target.daemon
    assert daemon.alive(), f"daemon B died:\n{daemon.log()[-4000:]}"
    status = daemon.call("daemon.status")
    assert status["listen"] == daemon.address, status
    wait_for(
        lambda: vm_names(daemon) == [BYSTANDER],
        timeout=10,
        what=f"B to host only {BYSTANDER} (it has {vm_names(daemon)})",
    )
    assert daemon.call("daemon.status")["vms"] == 1
    before = daemon.call("vm.show", name=BYSTANDER)
    assert before["state"] == "running", before
    wait_for(
        lambda: heartbeat(daemon, BYSTANDER) > before["guest"]["heartbeat_generation"] + 5,
        timeout=10,
        what="the bystander's heartbeat to rise",
    )
    after = daemon.call("vm.show", name=BYSTANDER)
    assert after["state"] == "running", after
    assert after["guest"]["verification_errors"] == 0, after
    assert after["error"] is None, after


class LogWatch:
    """B's JSON log events from the moment this watch was made."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.path = daemon.log_path
        self.offset = self.path.stat().st_size

    def events(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read()
        events = []
        for line in data.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line still being written, or not JSON (a traceback on stderr)
            if isinstance(event, dict):
                events.append(event)
        return events

    def find(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]

    def wait(self, name: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(name, **fields)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                tail = "\n".join(json.dumps(e) for e in self.events()[-20:])
                raise AssertionError(f"B logged no {name} {fields} within {timeout} s; B's log since:\n{tail}")
            time.sleep(0.02)

    def names(self) -> list[str]:
        return [str(e.get("event")) for e in self.events()]


class Peer:
    """A plain TCP socket to B's peer port; with a key, also a transport.Connection (SOURCE)
    that this test drives by hand and may bypass with raw bytes."""

    def __init__(self, target: TargetHost, *, key: bytes | None = None, unauthenticated: bool = False) -> None:
        host, port = target.daemon.address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        # B logs each incoming connection with peer=HOST:PORT of this socket.
        self.address = "{}:{}".format(*self.sock.getsockname()[:2])
        self._conn = None
        if key is not None or unauthenticated:
            self._conn = Connection(Role.SOURCE, node="hostile-peer", psk=key, allow_unauthenticated=unauthenticated)

    @property
    def conn(self) -> Connection:
        assert self._conn is not None, "a raw peer speaks no protocol"
        return self._conn

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        """Bytes as given; B may already have closed (it refuses early): that is fine."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send(self, event: Event) -> None:
        self.send_raw(self.conn.send(event))

    def sealed(self, data: bytes) -> bytes:
        """A frame built by hand as this peer puts it on the wire: as it is until the peer's own
        Auth, then sealed as its next record (transport/seal.py)."""
        sealer = self._conn.sealer if self._conn is not None else None
        if sealer is None:
            return data
        return b"".join(bytes(part) for part in sealer.seal([data]))

    def send_frame(self, data: bytes) -> None:
        """What a peer that knows the key but breaks the rules sends: a hand-built frame, sealed."""
        self.send_raw(self.sealed(data))

    def receive(self) -> Event:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Event)
                return event
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            self.conn.receive_data(data)

    def handshake(self) -> None:
        self.send(self.conn.make_hello())
        assert isinstance(self.receive(), Hello)
        self.send(self.conn.make_auth())
        assert isinstance(self.receive(), Auth)
        assert self.conn.state is State.READY and self.conn.authenticated

    def offer(self, description: VmDescription) -> Event:
        """Send a VM description; B's answer (Accept or Abort)."""
        self.send(description)
        return self.receive()

    def end_of_input(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def closed_by_target(self, timeout: float = 10.0) -> bytes:
        """Wait until B closes the connection (EOF or reset); the bytes it sent meanwhile."""
        self.sock.settimeout(timeout)
        received = bytearray()
        try:
            while chunk := self.sock.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"B kept the connection from {self.address} open for {timeout} s") from None
        return bytes(received)


def frame(header: dict[str, Any] | bytes, payload: bytes = b"", *, payload_len: int | None = None) -> bytes:
    """A frame exactly as given (framing.PREFIX, msgpack header, payload), nothing checked."""
    body = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    length = len(payload) if payload_len is None else payload_len
    return framing.PREFIX.pack(len(body), length) + body + payload


def indices(values: list[int]) -> bytes:
    return np.array(values, dtype="<u8").tobytes()


def page_batch_frame(
    slot: int,
    pages: list[int],
    zero: tuple[int, ...] | list[int] = (),
    *,
    n_pages: int | None = None,
    data: bytes | None = None,
    header_only: bool = False,
) -> bytes:
    """A PageBatch frame built by hand: transport.Connection refuses to send an invalid one.

    header_only: the prefix (with the payload length the counts call for) and the header,
    without the payload, for batches B must refuse on their header alone."""
    zero = list(zero)
    if data is None:
        data = b"\xa5" * (PAGE * len(pages))
    count = len(pages) if n_pages is None else n_pages
    header = {"t": "page_batch", "slot": slot, "round": 0, "n_pages": count, "n_zero": len(zero)}
    if header_only:
        want = framing.page_payload_len(count, len(zero), PAGE)
        return frame(header, payload_len=want)
    return frame(header, indices(pages) + indices(zero) + data)


def page_batch(pages: list[int]) -> PageBatch:
    """A valid batch, sent through the Connection like any honest source would."""
    return PageBatch(
        slot=0,
        round=0,
        pages=np.array(pages, dtype=np.uint64),
        zero_pages=np.empty(0, dtype=np.uint64),
        data=bytes(PAGE * len(pages)),
    )


def hello_header(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "t": "hello",
        "version_min": 2,
        "version_max": 2,
        "node": "hostile-peer",
        "nonce": os.urandom(limits.NONCE_BYTES),
        "auth": "psk",
        "capabilities": [],
        "max_batch_bytes": limits.DEFAULT_MAX_BATCH_BYTES,
    }
    header.update(changes)
    return header


def new_name() -> str:
    return f"intruder-{uuid.uuid4().hex[:8]}"


def spec_wire(name: str, **changes: Any) -> dict[str, Any]:
    wire = VmSpec(name=name, **SMALL_VM).to_wire()
    wire.update(changes)
    return wire


def description(
    target: TargetHost,
    name: str,
    *,
    spec: dict[str, Any] | None = None,
    features: dict[str, Any] | None = None,
    **changes: Any,
) -> VmDescription:
    """What migrated/migration/source.py sends for a small VM, with `changes` applied."""
    fields: dict[str, Any] = {
        "name": name,
        "migration_id": f"m-hostile-{uuid.uuid4().hex[:8]}",
        "memory": ((0, 0, VM_MIB * MIB),),
        "vcpus": 1,
        "guest_kind": "workload",
        "cpu_features": {
            "spec": spec_wire(name) if spec is None else spec,
            "run_state": "running",
            **target.cpu,
            **(features or {}),
        },
        "dirty_tracking": "ring",
        "arch": "x86_64",
    }
    fields.update(changes)
    return VmDescription(**fields)


def description_header(target: TargetHost, vm_name: str, **changes: Any) -> dict[str, Any]:
    """A vm_description header for a raw frame: values VmDescription itself would refuse."""
    name = vm_name
    header: dict[str, Any] = {
        "t": "vm_description",
        "name": name,
        "migration_id": f"m-hostile-{uuid.uuid4().hex[:8]}",
        "memory": [[0, 0, VM_MIB * MIB]],
        "vcpus": 1,
        "guest_kind": "workload",
        "cpu_features": {"spec": spec_wire(name), "run_state": "running", **target.cpu},
        "dirty_tracking": "ring",
        "page_size": PAGE,
        "arch": "x86_64",
    }
    header.update(changes)
    return header


def accepted_peer(target: TargetHost, name: str, **changes: Any) -> Peer:
    """An authenticated peer whose VM B accepted: B holds an incoming copy, pages may flow.
    `changes` go into its description."""
    peer = Peer(target, key=target.key)
    try:
        peer.handshake()
        answer = peer.offer(description(target, name, **changes))
        assert isinstance(answer, Accept), answer
        # B answers ACCEPT once the RAM exists and builds the VM behind it (beside the bulk copy).
        wait_for(
            lambda: any(vm["name"] == name and vm["state"] == "incoming" for vm in target.daemon.call("vm.list")),
            what=f"B's incoming copy of {name}",
        )
    except BaseException:
        peer.sock.close()
        raise
    return peer


def assert_refused_connection(log: LogWatch, peer: Peer, *words: str) -> dict[str, Any]:
    """B logged incoming_connection_failed for this peer, its error naming the problem."""
    event = log.wait("incoming_connection_failed", peer=peer.address)
    for word in words:
        assert word in event["error"], (word, event)
    return event
