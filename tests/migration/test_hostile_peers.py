"""Hostile peers against a real target daemon (DESIGN sections 4 and 6).

One daemon B hosts a running VM, "bystander", for the whole module. Peers then do what an
attacker, a confused client or a broken link would: the wrong key, bytes that are not the
protocol, frames with absurd lengths, frames cut short, and a source that knows the key but
describes a VM B cannot host or sends page batches that point outside guest RAM.

After every attempt: B is alive and answers, "bystander" runs with its heartbeat rising and no
verification error, no other VM exists on B, and B's log has an event for that very connection
(matched by the peer's address) whose error names the problem.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import numpy as np
import pytest

from daemons import DaemonProcess, heartbeat, wait_for, wait_migration
from helpers import write_key
from hostile import (
    BYSTANDER,
    B_TIMEOUT_S,
    LogWatch,
    MIB,
    PAGE,
    Peer,
    SLOT_PAGES,
    SMALL_VM,
    TargetHost,
    VM_MIB,
    accepted_peer,
    assert_refused_connection,
    assert_unharmed,
    description,
    description_header,
    frame,
    hello_header,
    indices,
    new_name,
    page_batch,
    page_batch_frame,
    spec_wire,
    vm_names,
)
from migrated.kvm.system import Kvm
from migrated.migration import vmstate
from migrated.pagehash import ram_digest
from migrated.peer import FINAL_PAGES_ON_CONTROL
from transport import (
    Abort,
    Accept,
    Auth,
    Connection,
    DeviceState,
    Done,
    Hello,
    Role,
    State,
    VmDescription,
)
from transport import framing, limits
from transport.datastream import MAGIC as DATA_MAGIC
from transport.datastream import DataHello, DataSender, Layout

pytestmark = pytest.mark.kvm


# ---- the target daemon and its bystander --------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TargetHost]:
    workdir = tmp_path_factory.mktemp("hostile")
    key = os.urandom(32)
    config = workdir / "b.toml"
    config.write_text(f"[peer]\nconnect_timeout_s = {B_TIMEOUT_S}\n")
    daemon = DaemonProcess("b", workdir, write_key(workdir / "b.key", key), extra_args=("--config", str(config)))
    kvm = Kvm.open()
    try:
        cpu = vmstate.cpu_features(kvm)
    finally:
        kvm.close()
    try:
        daemon.start()
        daemon.call("vm.create", name=BYSTANDER, **SMALL_VM)
        wait_for(lambda: heartbeat(daemon, BYSTANDER) > 0, what="the bystander's first heartbeat")
        yield TargetHost(daemon, key, cpu)
    finally:
        daemon.stop()


# ---- 1. the wrong key ---------------------------------------------------------------------


def test_source_with_the_wrong_key_is_refused_before_any_vm_data(target: TargetHost, tmp_path: Path) -> None:
    log = LogWatch(target.daemon)
    a = DaemonProcess("a", tmp_path, write_key(tmp_path / "a.key", os.urandom(32)))
    try:
        a.start()
        a.call("vm.create", name="traveller", **SMALL_VM)
        wait_for(lambda: heartbeat(a, "traveller") > 0, what="traveller's first heartbeat")
        a.call("migrate", name="traveller", to=target.daemon.address)
        stats = wait_migration(a, "traveller", timeout=30)
        assert stats["state"] == "failed", stats
        # A keeps its VM, running.
        shown = a.call("vm.show", name="traveller")
        assert shown["state"] == "running", shown
        wait_for(
            lambda: heartbeat(a, "traveller") > shown["guest"]["heartbeat_generation"] + 5,
            what="traveller's heartbeat to rise on A",
        )
        assert a.call("vm.show", name="traveller")["guest"]["verification_errors"] == 0
    finally:
        a.stop()
    event = log.wait("incoming_connection_failed")
    assert "peer failed authentication" in event["error"], event
    assert "incoming_vm_accepted" not in log.names()
    assert "vm_created" not in log.names()
    assert "traveller" not in vm_names(target.daemon)
    assert_unharmed(target)
    # Last, so that everything above is checked either way: A's operator learns why.
    assert "authenticat" in (stats.get("error") or "").lower(), (
        f"A's migration failed, but its error does not say that authentication failed: {stats.get('error')!r}"
    )


def test_wrong_key_by_hand_gets_no_mac_from_b(target: TargetHost) -> None:
    """B checks the source's MAC before it sends its own: a peer without the key learns
    nothing it could use, and never gets to describe a VM."""
    log = LogWatch(target.daemon)
    with Peer(target, key=os.urandom(32)) as peer:
        peer.send(peer.conn.make_hello())
        assert isinstance(peer.receive(), Hello)
        peer.send(peer.conn.make_auth())
        # Try to go on as if authenticated: a description right behind the Auth.
        peer.send_raw(frame(description_header(target, new_name())))
        received = peer.closed_by_target()
        assert received == b"", "B sent something after a failed authentication"
    assert_refused_connection(log, peer, "peer failed authentication")
    assert "incoming_vm_accepted" not in log.names()
    assert_unharmed(target)


# ---- 2, 3. bytes that are not the protocol ------------------------------------------------


def _random_garbage() -> bytes:
    data = random.Random(20240611).randbytes(64)
    assert int.from_bytes(data[:4], "big") > limits.MAX_HEADER_BYTES  # the seed's property
    return data


NOT_THE_PROTOCOL = {
    "64 random bytes": (_random_garbage(), ["frame header length", "exceeds 65536"]),
    "an HTTP request": (
        b"GET / HTTP/1.1\r\nHost: migrated\r\nUser-Agent: curl/8.0\r\n\r\n",
        ["frame header length 1195725856 exceeds 65536"],
    ),
    "a TLS ClientHello": (
        bytes.fromhex("160301020001000200") + bytes(500),
        ["frame header length 369295618 exceeds 65536"],
    ),
    "header length 2**31": (
        framing.PREFIX.pack(1 << 31, 0) + bytes(64),
        ["frame header length 2147483648 exceeds 65536"],
    ),
    "header length 2**32-1": (
        framing.PREFIX.pack((1 << 32) - 1, (1 << 32) - 1),
        ["frame header length 4294967295 exceeds 65536"],
    ),
    "header length 0": (framing.PREFIX.pack(0, 0) + bytes(16), ["frame header length 0"]),
    "payload length 2**31 on a Hello": (
        frame(hello_header(), payload_len=1 << 31),
        ["frame payload length 2147483648 exceeds 67108864"],
    ),
    "payload length 2**32-1, header of 16 bytes": (
        framing.PREFIX.pack(16, (1 << 32) - 1),
        ["frame payload length 4294967295 exceeds"],
    ),
    "a payload on a Hello": (
        frame(hello_header(), b"x" * 100),
        ["frame payload length 100 for 'hello', which carries no payload"],
    ),
    "a header that is not msgpack": (frame(b"\xc1" * 12), ["not a valid msgpack map"]),
    "a header that is a msgpack array": (
        frame(msgpack.packb([1, 2, 3])),
        ["frame header must be a msgpack map, got array"],
    ),
    "an unknown message type": (frame({"t": "gimme_root"}), ["unknown message type 'gimme_root'"]),
    "a Hello without a nonce": (
        frame({k: v for k, v in hello_header().items() if k != "nonce"}),
        ["'hello' message lacks field 'nonce'"],
    ),
    "a Hello with a str version": (
        frame(hello_header(version_min="1")),
        ["'hello' field 'version_min' must be int, got str"],
    ),
    "a Hello with a 1 GiB batch": (frame(hello_header(max_batch_bytes=1 << 30)), ["Hello.max_batch_bytes must be in"]),
}


@pytest.mark.parametrize("label", NOT_THE_PROTOCOL)
def test_bytes_that_are_not_the_protocol_close_that_connection(target: TargetHost, label: str) -> None:
    data, words = NOT_THE_PROTOCOL[label]
    log = LogWatch(target.daemon)
    with Peer(target) as peer:
        peer.send_raw(data)
        assert peer.closed_by_target() == b""
    assert_refused_connection(log, peer, "peer broke the protocol", *words)
    assert_unharmed(target)


# ---- 4. frames cut short ------------------------------------------------------------------


TRUNCATED = {
    "5 bytes of a prefix": (frame(hello_header())[:5], "(5 bytes of an unfinished frame)"),
    "a prefix and half a Hello": (frame(hello_header())[:40], "(40 bytes of an unfinished frame)"),
    "a Hello less its last byte": (frame(hello_header())[:-1], "bytes of an unfinished frame"),
}


@pytest.mark.parametrize("label", TRUNCATED)
def test_truncated_frame_then_eof(target: TargetHost, label: str) -> None:
    data, words = TRUNCATED[label]
    log = LogWatch(target.daemon)
    with Peer(target) as peer:
        peer.send_raw(data)
        peer.end_of_input()
        assert peer.closed_by_target() == b""
    assert_refused_connection(log, peer, "connection closed mid-frame", words)
    assert_unharmed(target)


def test_silent_peer_is_dropped_after_the_timeout(target: TargetHost) -> None:
    """A peer that connects and stalls (half a frame, then nothing) holds no resources for
    long: B drops it after peer.connect_timeout_s and says that it timed out."""
    log = LogWatch(target.daemon)
    with Peer(target) as peer:
        peer.send_raw(frame(hello_header())[:10])
        started = time.monotonic()
        peer.closed_by_target(timeout=B_TIMEOUT_S + 8)
        waited = time.monotonic() - started
    assert waited >= B_TIMEOUT_S - 0.5, f"B dropped a slow peer after only {waited:.1f} s"
    event = log.wait("incoming_connection_failed", peer=peer.address)
    assert_unharmed(target)
    error = event["error"]
    assert any(word in error for word in ("handshake", "nothing received", "no progress")), (
        f"B's error for a peer that stalled in the handshake does not say what timed out: {error!r}"
    )


# ---- the handshake: nothing before authentication -----------------------------------------


def test_a_description_right_behind_the_sources_auth_is_hosted(target: TargetHost) -> None:
    """What the source daemon sends (transport/states.py rule 4): its Auth and the sealed
    description in one write, before B proved the key. B checks the Auth, proves the key,
    and only then reads and hosts the description."""
    log = LogWatch(target.daemon)
    name = new_name()
    with Peer(target, key=target.key) as peer:
        peer.send(peer.conn.make_hello())
        assert isinstance(peer.receive(), Hello)
        peer.send_raw(peer.conn.send(peer.conn.make_auth()) + peer.conn.send(description(target, name)))
        assert peer.conn.state is State.DESCRIBED_EARLY
        assert isinstance(peer.receive(), Auth) and peer.conn.authenticated
        assert isinstance(peer.receive(), Accept)
        log.wait("incoming_vm_accepted", vm=name)
        peer.send(Abort.from_text("test over"))
    wait_for(lambda: name not in vm_names(target.daemon), what="B to discard the copy")
    assert_unharmed(target)


def test_vm_description_as_the_first_frame(target: TargetHost) -> None:
    log = LogWatch(target.daemon)
    with Peer(target) as peer:
        peer.send_raw(frame(description_header(target, new_name())))
        assert peer.closed_by_target() == b""
    assert_refused_connection(log, peer, "VmDescription before authentication completed")
    assert "incoming_vm_accepted" not in log.names()
    assert_unharmed(target)


@pytest.mark.parametrize("what", ["vm_description", "page_batch", "query"])
def test_vm_data_after_hello_without_auth(target: TargetHost, what: str) -> None:
    log = LogWatch(target.daemon)
    with Peer(target, key=target.key) as peer:
        peer.send(peer.conn.make_hello())
        assert isinstance(peer.receive(), Hello)
        assert peer.conn.state is State.AUTH_SOURCE
        data = {
            "vm_description": frame(description_header(target, new_name())),
            "page_batch": page_batch_frame(0, [0]),
            "query": frame({"t": "query", "migration_id": "m-someone-elses"}),
        }[what]
        peer.send_raw(data)
        assert peer.closed_by_target() == b""
    event_name = {"vm_description": "VmDescription", "page_batch": "PageBatch", "query": "Query"}[what]
    assert_refused_connection(log, peer, f"{event_name} before authentication completed")
    assert "incoming_vm_accepted" not in log.names()
    assert "query_answered" not in log.names()
    assert_unharmed(target)


def test_unauthenticated_hello_is_refused(target: TargetHost) -> None:
    log = LogWatch(target.daemon)
    with Peer(target, unauthenticated=True) as peer:
        peer.send(peer.conn.make_hello())
        assert peer.closed_by_target() == b""
    assert_refused_connection(log, peer, "auth mismatch", "'none'", "'psk'")
    assert_unharmed(target)


def test_hello_with_no_common_version_is_refused(target: TargetHost) -> None:
    log = LogWatch(target.daemon)
    with Peer(target) as peer:
        peer.send_raw(frame(hello_header(version_min=7, version_max=9)))
        assert peer.closed_by_target() == b""
    assert_refused_connection(log, peer, "no common protocol version", "7..9")
    assert_unharmed(target)


def test_a_peer_of_protocol_version_1_is_refused_clearly(target: TargetHost) -> None:
    """Version 1 sent every frame after the handshake in the clear: B refuses it at HELLO, and
    says why, rather than meeting it half way."""
    log = LogWatch(target.daemon)
    with Peer(target) as peer:
        peer.send_raw(frame(hello_header(version_min=1, version_max=1)))
        assert peer.closed_by_target() == b""
    assert_refused_connection(
        log, peer, "no common protocol version", "peer speaks 1..1", "version 2 seals every frame"
    )
    assert_unharmed(target)


# ---- 5. a source that knows the key, then lies in its page batches ------------------------


BAD_BATCHES = {
    "page index just past the slot": (
        page_batch_frame(0, [SLOT_PAGES]),
        [f"page index {SLOT_PAGES} outside slot 0 ({SLOT_PAGES} pages)"],
    ),
    "page index 2**64-1 behind a valid one": (
        page_batch_frame(0, [0, (1 << 64) - 1]),
        [f"page index {(1 << 64) - 1} outside slot 0 ({SLOT_PAGES} pages)"],
    ),
    "zero-page index past the slot": (
        page_batch_frame(0, [], [SLOT_PAGES + 5]),
        [f"zero page index {SLOT_PAGES + 5} outside slot 0 ({SLOT_PAGES} pages)"],
    ),
    "payload shorter than its counts": (
        page_batch_frame(0, [1, 2], data=b"\xa5" * PAGE),
        ["PageBatch payload length 4112 does not match 2 pages + 0 zero pages of 4096 bytes", "expected 8208"],
    ),
    "payload longer than its counts": (
        page_batch_frame(0, [1], data=b"\xa5" * (2 * PAGE)),
        ["PageBatch payload length 8200 does not match 1 pages + 0 zero pages", "expected 4104"],
    ),
    "count of 2**32 pages": (
        page_batch_frame(0, [1], n_pages=1 << 32),
        ["PageBatch n_pages 4294967296 is outside 0..8388608"],
    ),
    "unknown slot": (page_batch_frame(7, [0]), ["unknown slot 7 (the VM has slots [0])"]),
    "slot 2**32-1": (page_batch_frame((1 << 32) - 1, [0]), [f"unknown slot {(1 << 32) - 1}"]),
    "more than the negotiated batch": (
        page_batch_frame(0, list(range(4096))),
        ["PageBatch payload length 16809984 exceeds the negotiated max batch 8388608"],
    ),
    "a negative round": (
        frame({"t": "page_batch", "slot": 0, "round": -1, "n_pages": 1, "n_zero": 0}, indices([0]) + bytes(PAGE)),
        ["PageBatch.round must be in"],
    ),
}


@pytest.mark.parametrize("label", BAD_BATCHES)
def test_page_batch_outside_guest_ram_discards_the_incoming_vm(target: TargetHost, label: str) -> None:
    data, words = BAD_BATCHES[label]
    name = new_name()
    log = LogWatch(target.daemon)
    with accepted_peer(target, name) as peer:
        log.wait("incoming_vm_accepted", vm=name)
        # One valid batch first: B takes real pages, then meets the bad one.
        peer.send_frame(page_batch_frame(0, [0, 1]))
        peer.send_frame(data)
        assert peer.closed_by_target() == b"", "B answered a broken batch instead of closing"
    assert_refused_connection(log, peer, "peer broke the protocol", *words)
    discarded = log.wait("incoming_vm_discarded", vm=name)
    for word in words:
        assert word in discarded["reason"], (word, discarded)
    log.wait("vm_removed", vm=name)
    assert_unharmed(target)


def test_truncated_page_batch_then_eof_discards_the_incoming_vm(target: TargetHost) -> None:
    name = new_name()
    log = LogWatch(target.daemon)
    with accepted_peer(target, name) as peer:
        record = peer.sealed(page_batch_frame(0, [3, 4, 5]))
        peer.send_raw(record[: len(record) - PAGE - 100])
        peer.end_of_input()
        assert peer.closed_by_target() == b""
    assert_refused_connection(log, peer, "connection closed mid-record")
    log.wait("incoming_vm_discarded", vm=name)
    assert_unharmed(target)


def test_source_vanishing_after_accept_discards_the_incoming_vm(target: TargetHost) -> None:
    name = new_name()
    log = LogWatch(target.daemon)
    with accepted_peer(target, name) as peer:
        peer.send_frame(page_batch_frame(0, [0]))
    assert_refused_connection(log, peer, "closed the connection")
    log.wait("incoming_vm_discarded", vm=name)
    assert_unharmed(target)


# ---- the end of a lying migration: state and Done -----------------------------------------


def test_done_without_device_state_is_aborted_with_a_reason(target: TargetHost) -> None:
    name = new_name()
    log = LogWatch(target.daemon)
    with accepted_peer(target, name) as peer:
        peer.send(page_batch([0, 1]))
        peer.send(Done(pages_total=2, digest=None, verify="off"))
        answer = peer.receive()
        assert isinstance(answer, Abort), answer
        assert "device state" in answer.reason, answer
    log.wait("incoming_vm_refused")
    log.wait("incoming_vm_discarded", vm=name)
    assert "incoming_vm_running" not in log.names()
    assert_unharmed(target)


@pytest.mark.parametrize("announced", ["full", None], ids=["verify announced", "an older source"])
@pytest.mark.parametrize("right", [True, False], ids=["right digest", "wrong digest"])
def test_the_digest_in_done_is_checked_whether_or_not_verify_was_announced(
    target: TargetHost, announced: str | None, right: bool
) -> None:
    """With verify announced in the description B digests its RAM when the state arrives; from
    an older source, which announces nothing, after Done. Either way Done's digest decides: a
    wrong one is refused before any state is restored, and the right one lets the restore go on
    (here it then refuses the unrestorable state, which shows the digest passed)."""
    name = new_name()
    log = LogWatch(target.daemon)
    ram = np.zeros(VM_MIB * MIB, dtype=np.uint8)  # what B's RAM holds: the pages sent are zeros
    digest = ram_digest([(0, ram)]).sha256 if right else bytes(32)
    with accepted_peer(target, name, verify=announced) as peer:
        peer.send(page_batch([0, 1]))
        peer.send(DeviceState(kind=vmstate.X86_MACHINE, blob=msgpack.packb({"version": 99})))
        peer.send(Done(pages_total=2, digest=digest, verify="full"))
        answer = peer.receive()
        assert isinstance(answer, Abort), answer
        expected = "state restore failed" if right else "memory digest mismatch"
        assert expected in answer.reason, answer
    assert bool(log.find("target_digest_started", peer=peer.address)) == (announced == "full"), log.names()
    log.wait("incoming_vm_discarded", vm=name)
    assert "incoming_vm_running" not in log.names()
    assert_unharmed(target)


FLAT = "x86-machine-flat"


@pytest.mark.parametrize(
    ("kind", "blob", "words"),
    [
        (vmstate.X86_MACHINE, b"garbage", ["machine state is not valid msgpack"]),
        (vmstate.X86_MACHINE, msgpack.packb({}), ["x86 state: missing key 'version'"]),
        (vmstate.X86_MACHINE, msgpack.packb({"version": 99}), ["version 99 is newer"]),
        (FLAT, b"garbage", ["x86 flat state: header: 7 bytes, shorter than the header's 40"]),
        (FLAT, msgpack.packb({"version": 1}) + bytes(40), ["x86 flat state: header: magic"]),
        (FLAT, b"MX86" + struct.pack("<H", 99) + bytes(34), ["x86 flat state: version: 99"]),
        # A record cut short inside its first vCPU.
        (FLAT, b"MX86" + struct.pack("<HHIII", 1, 0, 1, 4096, 40) + bytes(24) + bytes(8), ["inside this vCPU"]),
    ],
    ids=["not msgpack", "empty map", "future version", "flat short", "flat magic", "flat future", "flat cut"],
)
def test_malformed_machine_state_is_aborted_with_a_reason(
    target: TargetHost, kind: str, blob: bytes, words: list[str]
) -> None:
    name = new_name()
    log = LogWatch(target.daemon)
    with accepted_peer(target, name) as peer:
        peer.send(DeviceState(kind=kind, blob=blob))
        peer.send(Done(pages_total=0, digest=None, verify="off"))
        answer = peer.receive()
        assert isinstance(answer, Abort), answer
        for word in ["state restore failed", *words]:
            assert word in answer.reason, (word, answer)
    refused = log.wait("incoming_vm_refused")
    assert words[0] in refused["error"], refused
    log.wait("incoming_vm_discarded", vm=name)
    assert "incoming_vm_running" not in log.names()
    assert_unharmed(target)


def test_done_with_a_wrong_page_count_closes_the_connection(target: TargetHost) -> None:
    name = new_name()
    log = LogWatch(target.daemon)
    with accepted_peer(target, name) as peer:
        peer.send_frame(page_batch_frame(0, [0, 1]))
        peer.send_frame(frame({"t": "done", "pages_total": 5, "digest": None, "verify": "off"}))
        assert peer.closed_by_target() == b""
    assert_refused_connection(log, peer, "Done.pages_total 5", "carried 2 page entries")
    log.wait("incoming_vm_discarded", vm=name)
    assert_unharmed(target)


def test_device_state_flood_is_bounded(target: TargetHost) -> None:
    """DESIGN 6: counts from the wire are bounded before use. A source may send DeviceState
    messages of up to 16 MiB each; B restores exactly one blob, so it must not buffer an
    unbounded number of them before Done (each is kept in memory until then)."""
    name = new_name()
    blobs, blob_bytes = 24, limits.MAX_DEVICE_STATE_BYTES  # 384 MiB in all
    pid = target.daemon.process.pid  # type: ignore[union-attr]
    log = LogWatch(target.daemon)
    with accepted_peer(target, name) as peer:
        rss_before = rss_mib(pid)
        blob = os.urandom(1024) * (blob_bytes // 1024)
        sent = 0
        for _ in range(blobs):
            try:
                peer.sock.sendall(frame({"t": "device_state", "kind": "x86-machine"}, blob))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        time.sleep(0.5)  # let B take in what it received
        grown = rss_mib(pid) - rss_before
        print(f"sent {sent} DeviceState blobs of {blob_bytes >> 20} MiB; B's RSS grew {grown:.0f} MiB")
    log.wait("incoming_vm_discarded", vm=name)
    assert_unharmed(target)
    assert grown < 4 * blob_bytes / MIB, (
        f"B buffered {grown:.0f} MiB of device state from one peer ({sent} blobs of "
        f"{blob_bytes >> 20} MiB accepted): the number of DeviceState messages is not bounded"
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


# ---- 6. descriptions B cannot host: Abort with the reason ---------------------------------


def _unhostable(target: TargetHost, label: str, name: str) -> VmDescription:
    spec = spec_wire(name)
    cases: dict[str, Any] = {
        "two memory slots": lambda: description(target, name, memory=((0, 0, VM_MIB * MIB), (1, 1 << 32, 16 * PAGE))),
        "a slot larger than the spec": lambda: description(target, name, memory=((0, 0, 2 * VM_MIB * MIB),)),
        "a slot not at address 0": lambda: description(target, name, memory=((0, 1 << 30, VM_MIB * MIB),)),
        "4096 vCPUs": lambda: description(target, name, vcpus=4096),
        "a spec with 5000 vCPUs": lambda: description(target, name, spec={**spec, "vcpus": 5000}),
        "an invalid VM name": lambda: description(target, "no such name!", spec={**spec, "name": "no such name!"}),
        "a spec naming another VM": lambda: description(target, name, spec={**spec, "name": "someone-else"}),
        "the name of a VM B runs": lambda: description(target, BYSTANDER, spec=spec_wire(BYSTANDER)),
        "a spec that is a list": lambda: description(target, name, spec=[1, 2, 3]),  # type: ignore[arg-type]
        "a spec that is a string": lambda: description(target, name, spec="vm"),  # type: ignore[arg-type]
        "a spec with unknown keys": lambda: description(target, name, spec={**spec, "firmware": "evil.bin"}),
        "a working set larger than memory": lambda: description(target, name, spec={**spec, "working_set_mib": 4096}),
        "a foreign CPU": lambda: description(target, name, features={"cpu_vendor": "CyrixInstead"}),
        "another architecture": lambda: description(target, name, arch="aarch64"),
        "a run state of its own": lambda: description(target, name, features={"run_state": "owned"}),
        "a state format from the future": lambda: description(target, name, features={"state_version": 99}),
        "an MSR this KVM does not know": lambda: description(
            target, name, features={"msr_indices": [*target.cpu["msr_indices"], 0x4B564DFF]}
        ),
        "an XSAVE area larger than this KVM's": lambda: description(target, name, features={"xsave_bytes": 65536}),
        "more RAM allocated than the VM has": lambda: description(
            target, name, features={"allocated_bytes": VM_MIB * MIB + PAGE}
        ),
        "a RAM allocation that is text": lambda: description(target, name, features={"allocated_bytes": "all"}),
    }
    return cases[label]()  # type: ignore[no-any-return]


UNHOSTABLE = {
    "two memory slots": ["memory layout", "one slot at 0"],
    "a slot larger than the spec": ["memory layout", "one slot at 0"],
    "a slot not at address 0": ["memory layout", "one slot at 0"],
    "4096 vCPUs": ["4096 vCPUs", "this host allows 1 to"],
    "a spec with 5000 vCPUs": ["vCPUs 5000", "an integer from 1 to 64"],
    "an invalid VM name": ["VM name 'no such name!'"],
    "a spec naming another VM": ["its spec 'someone-else'"],
    "the name of a VM B runs": ["a VM named 'bystander' already exists"],
    "a spec that is a list": ["VM description", "spec", "map"],
    "a spec that is a string": ["VM description", "spec", "map"],
    "a spec with unknown keys": ["unknown keys ['firmware']"],
    "a working set larger than memory": ["working set (MiB) 4096"],
    "a foreign CPU": ["CyrixInstead", "differs from this host"],
    "another architecture": ["VM is aarch64; this host is x86_64"],
    "a run state of its own": ["run_state 'owned'"],
    "a state format from the future": ["state format is version 99", "upgrade the target"],
    "an MSR this KVM does not know": ["1 MSR(s) of the VM are unknown to this host's KVM: 0x4b564dff"],
    "an XSAVE area larger than this KVM's": ["XSAVE area is 65536 bytes; this host's KVM offers"],
    "more RAM allocated than the VM has": ["allocated_bytes", "allowed are 0 to the VM's memory"],
    "a RAM allocation that is text": ["allocated_bytes 'all'", "allowed are 0 to the VM's memory"],
}


@pytest.mark.parametrize("label", UNHOSTABLE)
def test_unhostable_description_gets_abort_with_a_reason(target: TargetHost, label: str) -> None:
    words = UNHOSTABLE[label]
    name = new_name()
    description_ = _unhostable(target, label, name)
    log = LogWatch(target.daemon)
    with Peer(target, key=target.key) as peer:
        peer.handshake()
        answer = peer.offer(description_)
        assert isinstance(answer, Abort), f"B answered {answer} to a VM it cannot host"
        peer.closed_by_target()
    # B refused it (or, should it have failed otherwise, said so): find the event either way.
    ended = wait_for(
        lambda: (
            log.find("incoming_vm_refused", peer=peer.address)
            or log.find("incoming_migration_crashed", peer=peer.address)
        ),
        timeout=10,
        what="B's event for the refused description",
    )[0]
    assert "incoming_vm_accepted" not in log.names()
    assert "vm_created" not in log.names()
    assert_unharmed(target)
    assert ended["event"] == "incoming_vm_refused", (
        f"B did not refuse the description as such: {ended['event']}: {answer.reason!r}"
    )
    for word in words:
        assert word in answer.reason, (word, answer.reason)
        assert word in ended["error"], (word, ended)


MALFORMED_DESCRIPTIONS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "5000 vCPUs": ({"vcpus": 5000}, ["VmDescription.vcpus must be in [1, 4096], got 5000"]),
    "0 vCPUs": ({"vcpus": 0}, ["VmDescription.vcpus must be in [1, 4096], got 0"]),
    "a page size of 8 KiB": ({"page_size": 8192}, ["VmDescription.page_size must be one of"]),
    "overlapping slots": ({"memory": [[0, 0, 2 * MIB], [1, MIB, 2 * MIB]]}, ["slots 0 and 1 overlap"]),
    "a slot named twice": ({"memory": [[0, 0, MIB], [0, 4 * MIB, MIB]]}, ["names a slot twice"]),
    "RAM above 2**52": ({"memory": [[0, 1 << 52, MIB]]}, ["guest_phys_addr must be in"]),
    "1025 memory regions": (
        {"memory": [[i, i * MIB, MIB] for i in range(1025)]},
        ["must hold 1 to 1024 regions, got 1025"],
    ),
    "no memory": ({"memory": []}, ["must hold 1 to 1024 regions, got 0"]),
    "a name with a newline": ({"name": "vm\nEVIL log line"}, ["VmDescription.name holds control"]),
    "an unknown field": ({"bootloader": "grub"}, ["unknown field 'bootloader'"]),
    "a CPUID entry of 39 bytes": (
        {"cpu_features": {"spec": {}, "vcpu_cpuid": [b"\0" * 40, b"\1" * 39]}},
        ["VmDescription.cpu_features.vcpu_cpuid[1] must be 40 bytes (struct kvm_cpuid_entry2)"],
    ),
    "257 CPUID entries": (
        {"cpu_features": {"spec": {}, "vcpu_cpuid": [i.to_bytes(4, "little") + bytes(36) for i in range(257)]}},
        ["VmDescription.cpu_features.vcpu_cpuid must be 1 to 256 CPUID entries"],
    ),
    "cpu_features nested 20 deep": (
        {"cpu_features": {"spec": {}, "x": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}},
        ["cpu_features nests deeper than"],
    ),
}


@pytest.mark.parametrize("label", MALFORMED_DESCRIPTIONS)
def test_malformed_description_closes_the_connection(target: TargetHost, label: str) -> None:
    changes, words = MALFORMED_DESCRIPTIONS[label]
    log = LogWatch(target.daemon)
    with Peer(target, key=target.key) as peer:
        peer.handshake()
        peer.send_frame(frame(description_header(target, new_name(), **changes)))
        assert peer.closed_by_target() == b""
    assert_refused_connection(log, peer, "peer broke the protocol", *words)
    assert "incoming_vm_accepted" not in log.names()
    assert "vm_created" not in log.names()
    assert_unharmed(target)


def test_many_hostile_peers_at_once(target: TargetHost) -> None:
    """Ten peers at the same time, each broken in its own way, some holding an accepted VM:
    each is refused alone and B, with its bystander, carries on."""
    log = LogWatch(target.daemon)
    holders = [(accepted_peer(target, name), name) for name in (new_name(), new_name())]
    authenticated = [Peer(target, key=target.key) for _ in range(4)]
    for peer in authenticated:
        peer.handshake()
    peers = [Peer(target) for _ in range(4)]
    try:
        for number, peer in enumerate(peers):
            peer.send_raw(framing.PREFIX.pack(1 << 31, number))
        for holder, _ in holders:
            holder.send_frame(page_batch_frame(0, [SLOT_PAGES * 2]))
        for peer in authenticated:
            peer.send_frame(frame(description_header(target, new_name(), vcpus=0)))
        for peer in [*peers, *(h for h, _ in holders), *authenticated]:
            peer.closed_by_target()
    finally:
        for peer in [*peers, *(h for h, _ in holders), *authenticated]:
            peer.sock.close()
    for peer in peers:
        assert_refused_connection(log, peer, "frame header length 2147483648")
    for holder, name in holders:
        assert_refused_connection(log, holder, f"page index {SLOT_PAGES * 2} outside slot 0")
        log.wait("incoming_vm_discarded", vm=name)
    for peer in authenticated:
        assert_refused_connection(log, peer, "VmDescription.vcpus")
    assert_unharmed(target)


# ---- data streams: only the session's own source may add one ------------------------------


def _data_stream(target: TargetHost, hello: DataHello, magic: bytes = DATA_MAGIC) -> Peer:
    peer = Peer(target)
    peer.send_raw(magic + hello.encode())
    return peer


def test_a_data_stream_for_no_migration_in_progress_is_refused(target: TargetHost) -> None:
    log = LogWatch(target.daemon)
    with _data_stream(target, DataHello.make(os.urandom(32), "m-nobody-here", 0, 1)) as peer:
        assert peer.closed_by_target() == b""
    event = log.wait("data_stream_refused", peer=peer.address)
    assert "not in progress" in event["error"], event
    assert_unharmed(target)


def test_hellos_for_no_migration_hold_at_most_the_handshake_slots(target: TargetHost) -> None:
    """A stream naming no admitted migration has proved nothing: while it waits out the grace for
    its migration to be admitted (1 s), it keeps its handshake slot, so of a burst of such hellos
    all but MAX_DATA_HANDSHAKES (8) are refused at once instead of each holding an fd."""
    log = LogWatch(target.daemon)
    burst = [_data_stream(target, DataHello.make(os.urandom(32), f"m-nobody-{i}", 0, 1)) for i in range(16)]
    try:
        for peer in burst:
            assert peer.closed_by_target() == b""
        refusals = [log.wait("data_stream_refused", peer=peer.address)["error"] for peer in burst]
    finally:
        for peer in burst:
            peer.sock.close()
    too_many = [error for error in refusals if "too many data stream handshakes" in error]
    assert too_many, refusals  # without the bound every one waits its grace out
    assert all("too many" in error or "not in progress" in error for error in refusals), refusals
    assert_unharmed(target)


def test_bytes_after_the_data_magic_that_are_no_hello_are_refused(target: TargetHost) -> None:
    log = LogWatch(target.daemon)
    with Peer(target) as peer:
        peer.send_raw(b"MGET / HTTP/1.1\r\n\r\n" + bytes(64))
        assert peer.closed_by_target() == b""
    assert "bad magic" in log.wait("data_stream_refused", peer=peer.address)["error"]
    assert_unharmed(target)


def test_a_forged_data_stream_is_refused_and_a_bad_batch_on_a_real_one_discards_the_vm(target: TargetHost) -> None:
    """A stranger who knows the migration id (it is no secret) but not the session cannot add a
    stream: its token fails. The session's own stream is taken, and a page outside guest RAM on
    it ends the migration like one on the control connection would."""
    name = new_name()
    log = LogWatch(target.daemon)
    with Peer(target, key=target.key) as source:
        source.handshake()
        offer = description(target, name, features={"data_streams": 1})
        assert isinstance(source.offer(offer), Accept)
        # The VM is built behind ACCEPT: it exists before the stranger comes, as in a real setup.
        wait_for(lambda: name in vm_names(target.daemon), what=f"B's incoming copy of {name}")
        secret = source.conn.data_stream_secret()
        forged = DataHello.make(os.urandom(32), offer.migration_id, 0, 1)
        with _data_stream(target, forged) as stranger:
            assert stranger.closed_by_target() == b""
        assert "failed authentication" in log.wait("data_stream_refused", peer=stranger.address)["error"]
        assert name in vm_names(target.daemon), "a refused stranger must not end the real migration"
        with _data_stream(target, DataHello.make(secret, offer.migration_id, 0, 1)) as stream:
            log.wait("data_stream_attached", peer=stream.address)
            layout = Layout({0: SLOT_PAGES + 1}, PAGE, 8 * MIB)  # a sender that believes in more RAM
            sender = DataSender(secret, 0, layout, sealed=True)
            stream.send_raw(b"".join(bytes(b) for b in sender.batch(page_batch([SLOT_PAGES]))))
            failure = log.wait("incoming_connection_failed", peer=source.address)
            assert f"page index {SLOT_PAGES} outside slot 0" in failure["error"], failure
    log.wait("incoming_vm_discarded", vm=name)
    assert_unharmed(target)


def test_a_cpuid_table_kvm_refuses_is_refused_at_the_build(target: TargetHost) -> None:
    """A well-formed CPUID table (within the transport's bounds) that KVM will not take: the
    target builds the vCPUs with it behind ACCEPT, KVM_SET_CPUID2 fails, and the source is told
    why with an Abort (it would resume its VM), long before any downtime."""
    name = new_name()
    log = LogWatch(target.daemon)
    # Leaf 0x80000008 with 255 linear-address bits: KVM allows 48 or 57 (or 0).
    bad = struct.pack("<7I12x", 0x8000_0008, 0, 0, 0xFF00 | 48, 0, 0, 0)
    with Peer(target, key=target.key) as source:
        source.handshake()
        assert isinstance(source.offer(description(target, name, features={"vcpu_cpuid": [bad]})), Accept)
        answer = source.receive()
        assert isinstance(answer, Abort), answer
        assert f"cannot create VM {name} here" in answer.reason and "KVM_SET_CPUID2" in answer.reason, answer
    refused = log.wait("incoming_vm_refused", peer=source.address)
    assert "KVM_SET_CPUID2" in refused["error"], refused
    assert name not in vm_names(target.daemon)
    assert_unharmed(target)


@pytest.mark.parametrize("capability", [False, True])
def test_pages_on_the_control_connection_of_a_migration_with_data_streams_are_refused(
    target: TargetHost, capability: bool
) -> None:
    """A migration with data streams takes pages on its control connection only as its final
    pass, after every stream ended, and only from a source that negotiated that
    (final-pages-on-control): a page there could otherwise overtake a newer copy of itself on a
    stream. Without the capability a dirty round's batch is refused; with it, a bulk batch."""
    name = new_name()
    log = LogWatch(target.daemon)
    with Peer(target, key=target.key) as source:
        if capability:
            source._conn = Connection(
                Role.SOURCE, node="hostile-peer", psk=target.key, capabilities=(FINAL_PAGES_ON_CONTROL,)
            )
        source.handshake()
        negotiated = source.conn.negotiated
        assert negotiated is not None and (FINAL_PAGES_ON_CONTROL in negotiated.capabilities) is capability
        assert isinstance(source.offer(description(target, name, features={"data_streams": 1})), Accept)
        batch = page_batch([0])
        source.send(batch if capability else replace(batch, round=1))
        failure = log.wait("incoming_connection_failed", peer=source.address)
        assert "PageBatch on the control connection" in failure["error"], failure
    log.wait("incoming_vm_discarded", vm=name)
    assert_unharmed(target)
