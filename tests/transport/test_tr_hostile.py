"""Bytes a broken or hostile peer may send: each is refused with a message naming the problem,
before anything reaches guest memory, and the connection stays in ERROR."""

from __future__ import annotations

import struct
from dataclasses import FrozenInstanceError

import msgpack  # type: ignore[import-untyped]
import numpy as np
import pytest
from tr_helpers import (
    MIGRATION_ID,
    PAGE,
    batch,
    description,
    description_header,
    drain,
    drive,
    encoded,
    Frames,
    feed,
    handshake,
    make_pair,
    raw_frame,
    sealed_by,
    transfer,
    u64,
)

from transport import (
    Abort,
    Accept,
    Auth,
    Connection,
    DeviceState,
    Done,
    Hello,
    Loaded,
    LocalProtocolError,
    PageBatch,
    Query,
    QueryResult,
    RemoteProtocolError,
    Role,
    State,
)
from transport import framing, limits

NONCE = b"n" * 32


def hello_fields(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "t": "hello",
        "version_min": 2,
        "version_max": 2,
        "node": "evil",
        "nonce": NONCE,
        "auth": "psk",
        "capabilities": [],
        "max_batch_bytes": 8 << 20,
    }
    fields.update(changes)
    return fields


def refused(conn: Connection, data: bytes, match: str) -> RemoteProtocolError:
    """Feeding data makes conn raise RemoteProtocolError matching `match`, for good."""
    with pytest.raises(RemoteProtocolError, match=match) as info:
        feed(conn, data)
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        conn.next_event()
    return info.value


def target_at(state: State) -> Connection:
    return drive(state)[1]


# --- framing ------------------------------------------------------------------------------------


def test_garbage_bytes() -> None:
    refused(target_at(State.START), b"\xff" * 16, r"frame header length 4294967295 exceeds 65536")


def test_garbage_that_passes_the_prefix_is_not_msgpack() -> None:
    refused(
        target_at(State.START),
        struct.pack(">II", 4, 0) + b"\xc1\xc1\xc1\xc1",
        r"frame header is not a valid msgpack map",
    )


def test_oversized_header_length_refused_on_the_prefix_alone() -> None:
    refused(target_at(State.START), struct.pack(">II", 9999999, 0), r"frame header length 9999999 exceeds 65536")


def test_zero_header_length() -> None:
    refused(target_at(State.START), struct.pack(">II", 0, 0), r"frame header length 0")


def test_oversized_payload_length_refused_on_the_prefix_alone() -> None:
    refused(
        target_at(State.PAGES),
        Frames(struct.pack(">II", 10, (64 << 20) + 1)),
        r"frame payload length 67108865 exceeds 67108864",
    )


def test_payload_on_a_message_without_one() -> None:
    source, target = drive(State.DESCRIBED)
    refused(
        source, raw_frame({"t": "accept"}, b"12345"), r"frame payload length 5 for 'accept', which carries no payload"
    )


@pytest.mark.parametrize("cut", [3, 8, 30, 60, 100, 8000])
def test_truncated_frame_then_eof(cut: int) -> None:
    source, target = drive(State.PAGES, tls=True)
    data = source.send(batch(0, [1, 2]))
    assert len(data) == 8 + 44 + 16 + 2 * PAGE  # cuts: prefix, header, indices, data
    target.receive_data(data[:cut])
    assert drain(target) == []
    refused(target, b"", rf"connection closed mid-frame \({cut} bytes of an unfinished frame\)")


def test_header_is_not_a_map() -> None:
    body = msgpack.packb(["hello"])
    refused(
        target_at(State.START),
        struct.pack(">II", len(body), 0) + body,
        r"frame header must be a msgpack map, got array",
    )


def test_header_trailing_bytes() -> None:
    body = msgpack.packb(hello_fields()) + b"\x00"
    refused(target_at(State.START), struct.pack(">II", len(body), 0) + body, r"not a valid msgpack map")


def test_msgpack_ext_types_refused() -> None:
    body = msgpack.packb({"t": "abort", "reason": msgpack.ExtType(5, b"xx")})
    refused(target_at(State.READY), Frames(struct.pack(">II", len(body), 0) + body), r"not a valid msgpack map")


def test_unknown_type() -> None:
    refused(target_at(State.START), raw_frame({"t": "teleport"}), r"unknown message type 'teleport'")


def test_missing_type() -> None:
    refused(target_at(State.START), raw_frame({"x": 1}), r"no message type 't'")


def test_missing_field() -> None:
    fields = hello_fields()
    del fields["nonce"]
    refused(target_at(State.START), raw_frame(fields), r"'hello' message lacks field 'nonce'")


@pytest.mark.parametrize(("value", "got"), [("1", "str"), (True, "bool"), (1.0, "float")])
def test_field_of_the_wrong_type(value: object, got: str) -> None:
    refused(
        target_at(State.START),
        raw_frame(hello_fields(version_min=value)),
        rf"'hello' field 'version_min' must be int, got {got}",
    )


def test_unknown_field_refused_except_in_hello() -> None:
    source, target = drive(State.DESCRIBED)
    refused(source, raw_frame({"t": "accept", "extra": 1}), r"'accept' message has unknown field")
    target = target_at(State.START)
    [hello] = feed(target, raw_frame(hello_fields(future_field=[1, 2])))
    assert isinstance(hello, Hello)


# --- handshake ----------------------------------------------------------------------------------


def test_wrong_version() -> None:
    refused(
        target_at(State.START),
        raw_frame(hello_fields(version_min=3, version_max=5)),
        r"no common protocol version: peer speaks 3..5, this side 2..2",
    )


def test_a_version_1_peer_that_sends_frames_in_the_clear_is_refused_at_hello() -> None:
    refused(
        target_at(State.START),
        raw_frame(hello_fields(version_min=1, version_max=1)),
        r"peer speaks 1..1, this side 2..2 \(version 2 seals every frame after a psk handshake",
    )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"version_min": 0}, r"Hello.version_min must be in \[1, 65535\], got 0"),
        ({"version_min": 3, "version_max": 2}, r"Hello.version_max must be in \[3, 65535\], got 2"),
        ({"nonce": b"short"}, r"Hello.nonce must be 32 bytes, got 5 bytes"),
        ({"auth": "magic"}, r"Hello.auth must be one of \['none', 'psk', 'tls'\], got 'magic'"),
        ({"node": "a\x1b[31mb"}, r"Hello.node holds control characters"),
        ({"max_batch_bytes": 1 << 40}, r"Hello.max_batch_bytes must be in \[1048576, 67108864\]"),
        ({"capabilities": [{"x": 1}]}, r"Hello.capabilities must be a str, got dict"),
    ],
)
def test_invalid_hello_fields(changes: dict[str, object], match: str) -> None:
    refused(target_at(State.START), raw_frame(hello_fields(**changes)), match)


@pytest.mark.parametrize(
    ("source_mode", "target_mode", "match"),
    [
        (
            {"tls": True},
            {"psk": b"k" * 16},
            r"auth mismatch: peer offers 'tls', this side is "
            r"configured for 'psk'",
        ),
        ({"allow_unauthenticated": True}, {"psk": b"k" * 16}, r"peer offers 'none'"),
        ({"psk": b"k" * 16}, {"allow_unauthenticated": True}, r"peer offers 'psk'"),
    ],
)
def test_auth_modes_must_agree(source_mode: dict[str, object], target_mode: dict[str, object], match: str) -> None:
    source = Connection(Role.SOURCE, node="a", **source_mode)  # type: ignore[arg-type]
    target = Connection(Role.TARGET, node="b", **target_mode)  # type: ignore[arg-type]
    refused(target, source.send(source.make_hello()), match)


def test_unauthenticated_needs_the_operator_to_say_so() -> None:
    with pytest.raises(LocalProtocolError, match=r"no way to authenticate the peer"):
        Connection(Role.TARGET, node="b")
    with pytest.raises(LocalProtocolError, match=r"psk is 5 bytes; a key needs at least 16"):
        Connection(Role.TARGET, node="b", psk=b"short")
    with pytest.raises(LocalProtocolError, match=r"not both"):
        Connection(Role.TARGET, node="b", psk=b"k" * 16, tls=True)


def test_wrong_key_refused_before_any_vm_data() -> None:
    """The source's MAC fails at the target; nothing the source sends after it is yielded."""
    source = Connection(Role.SOURCE, node="a", psk=b"A" * 32)
    target = Connection(Role.TARGET, node="b", psk=b"B" * 32)
    transfer(source, target, source.make_hello())
    transfer(target, source, target.make_hello())
    auth = source.send(source.make_auth())
    sealed_description = source.send(description())  # right behind its Auth (states.py rule 4)
    assert source.state is State.DESCRIBED_EARLY and not source.authenticated
    with pytest.raises(LocalProtocolError, match="before authentication completed"):
        source.send(batch(0, [1]))  # no page before the target proved the key: the source refuses
    after = sealed_description + encoded(description()) + encoded(batch(0, [1]))
    target.receive_data(auth + after)
    with pytest.raises(RemoteProtocolError, match=r"^peer failed authentication$"):
        target.next_event()
    assert target.state is State.ERROR and not target.authenticated
    for _ in range(3):
        with pytest.raises(RemoteProtocolError):
            target.next_event()
    assert target.description is None and target.pages_transferred == 0


def test_target_mac_checked_by_the_source() -> None:
    source, target = make_pair()
    transfer(source, target, source.make_hello())
    transfer(target, source, target.make_hello())
    transfer(source, target, source.make_auth())
    forged = encoded(sample_auth := target.make_auth())
    flipped = bytes([forged[-1] ^ 1])
    assert sample_auth.mac
    refused(source, forged[:-1] + flipped, r"^peer failed authentication$")
    assert not source.authenticated


def test_description_behind_the_sources_auth_is_read_only_after_it_and_sealed() -> None:
    """States.py rule 4: Auth and the description in one write; the target checks the Auth
    before it reads the description, which travelled sealed; the source is authenticated
    only once the target's Auth came, and only then is the target's Accept taken."""
    source, target = make_pair()
    transfer(source, target, source.make_hello())
    transfer(target, source, target.make_hello())
    wire = source.send(source.make_auth()) + source.send(description())
    assert b"vm_description" not in wire and description().migration_id.encode() not in wire
    target.receive_data(wire)
    assert isinstance(target.next_event(), Auth) and target.state is State.AUTH_TARGET
    answer = target.send(target.make_auth())  # the target proves the key before it reads on
    assert target.authenticated
    assert target.next_event() == description() and target.state is State.DESCRIBED
    assert source.state is State.DESCRIBED_EARLY and not source.authenticated
    source.receive_data(answer + target.send(Accept()))
    assert isinstance(source.next_event(), Auth)
    assert source.state is State.DESCRIBED and source.authenticated
    assert isinstance(source.next_event(), Accept) and source.state is State.PAGES


def test_a_forged_target_auth_after_an_early_description_yields_nothing_after_it() -> None:
    """The source sent its description early; a target that cannot prove the key gets its
    Accept (or anything else) refused: the source never takes a decision from it."""
    source, target = make_pair()
    transfer(source, target, source.make_hello())
    transfer(target, source, target.make_hello())
    source.send(source.make_auth())
    source.send(description())
    forged = encoded(target.make_auth())
    refused(source, forged[:-1] + bytes([forged[-1] ^ 1]) + encoded(Accept()), r"^peer failed authentication$")
    assert not source.authenticated and source.state is State.ERROR


def test_replayed_mac_from_an_earlier_handshake_fails() -> None:
    source, target = make_pair()
    transfer(source, target, source.make_hello())
    transfer(target, source, target.make_hello())
    old_auth = source.send(source.make_auth())
    _, target2 = make_pair()
    source2, _ = make_pair()
    transfer(source2, target2, source2.make_hello())
    transfer(target2, source2, target2.make_hello())
    refused(target2, old_auth, r"peer failed authentication")


def test_reflected_hello_refused() -> None:
    source, _ = make_pair()
    hello = source.send(source.make_hello())
    theirs = msgpack.unpackb(hello[8:])
    refused(source, raw_frame(theirs), r"peer echoed this side's nonce")


def test_skipping_auth_is_refused() -> None:
    source, target = make_pair()
    transfer(source, target, source.make_hello())
    transfer(target, source, target.make_hello())
    refused(target, encoded(description()), r"VmDescription before authentication completed")


def test_query_before_auth_is_refused() -> None:
    source, target = make_pair()
    transfer(source, target, source.make_hello())
    refused(target, encoded(Query(MIGRATION_ID)), r"Query before authentication completed")


def test_own_events_must_come_from_the_helpers() -> None:
    source, target = make_pair()
    with pytest.raises(LocalProtocolError, match=r"use make_hello\(\)"):
        source.send(Hello(1, 1, "other-node", NONCE, "psk", frozenset(), 8 << 20))
    transfer(source, target, source.make_hello())
    transfer(target, source, target.make_hello())
    with pytest.raises(LocalProtocolError, match=r"use make_auth\(\)"):
        source.send(type(source.make_auth())(b"x" * 32))


# --- VM description -----------------------------------------------------------------------------


def _cpuid_entry(leaf: int) -> bytes:
    """A struct kvm_cpuid_entry2 for (leaf, index 0), registers zero."""
    return struct.pack("<II", leaf, 0) + bytes(32)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"memory": [[0, 0, 4096], [1, 0, 4096]]}, r"VmDescription.memory slots 0 and 1 overlap"),
        ({"memory": [[0, 0, 4096], [0, 8192, 4096]]}, r"VmDescription.memory names a slot twice"),
        ({"memory": [[0, 100, 4096]]}, r"multiples of the page size 4096"),
        ({"memory": []}, r"VmDescription.memory must hold 1 to 1024 regions, got 0"),
        ({"memory": [[0, 0, 1 << 53]]}, r"VmDescription.memory\[slot 0\].size must be in"),
        ({"vcpus": 0}, r"VmDescription.vcpus must be in \[1, 4096\], got 0"),
        ({"page_size": 1000}, r"VmDescription.page_size must be one of"),
        ({"arch": "sparc"}, r"VmDescription.arch must be one of"),
        ({"cpu_features": {"a": [[[[[[[[[[1]]]]]]]]]]}}, r"cpu_features nests deeper than 8"),
        ({"cpu_features": {"a": float("nan")}}, r"cpu_features holds a non-finite float"),
        ({"cpu_features": 5}, r"'vm_description' field 'cpu_features' must be map or array, got int"),
        # The x86 machine facts a source adds (the target builds and checks with them).
        (
            {"cpu_features": {"vcpu_cpuid": [_cpuid_entry(0), b"\0" * 39]}},
            r"VmDescription.cpu_features.vcpu_cpuid\[1\] must be 40 bytes \(struct kvm_cpuid_entry2\)",
        ),
        ({"cpu_features": {"vcpu_cpuid": [_cpuid_entry(0), 7]}}, r"vcpu_cpuid\[1\] must be 40 bytes"),
        (
            {"cpu_features": {"vcpu_cpuid": [_cpuid_entry(leaf) for leaf in range(257)]}},
            r"VmDescription.cpu_features.vcpu_cpuid must be 1 to 256 CPUID entries",
        ),
        ({"cpu_features": {"vcpu_cpuid": []}}, r"vcpu_cpuid must be 1 to 256 CPUID entries"),
        ({"cpu_features": {"vcpu_cpuid": _cpuid_entry(0)}}, r"vcpu_cpuid must be 1 to 256 CPUID entries"),
        (
            {"cpu_features": {"vcpu_cpuid": [_cpuid_entry(7), _cpuid_entry(7)]}},
            r"vcpu_cpuid gives the same \(function, index\) twice",
        ),
        (
            {"cpu_features": {"msr_indices": list(range(1025))}},
            r"VmDescription.cpu_features.msr_indices must be at most 1024 MSR indices",
        ),
        ({"cpu_features": {"msr_indices": [0x10, -1]}}, r"msr_indices\[1\] must be in \[0, 4294967295\], got -1"),
        ({"cpu_features": {"msr_indices": [0x10, 1 << 32]}}, r"msr_indices\[1\] must be in \[0, 4294967295\]"),
        ({"cpu_features": {"msr_indices": [0x10, "0x1b"]}}, r"msr_indices\[1\] must be an integer, got str"),
        ({"cpu_features": {"msr_indices": [0x10, 0x10]}}, r"msr_indices names an MSR twice"),
        ({"cpu_features": {"msr_indices": 16}}, r"msr_indices must be at most 1024 MSR indices"),
        ({"cpu_features": {"xsave_bytes": 512}}, r"cpu_features.xsave_bytes must be in \[4096, 65536\], got 512"),
        ({"cpu_features": {"xsave_bytes": 1 << 20}}, r"xsave_bytes must be in \[4096, 65536\]"),
        ({"cpu_features": {"xsave_bytes": True}}, r"xsave_bytes must be an integer, got bool"),
    ],
)
def test_invalid_description(changes: dict[str, object], match: str) -> None:
    refused(target_at(State.READY), raw_frame(description_header(**changes)), match)


# --- page batches -------------------------------------------------------------------------------


def page_frame(
    slot: int,
    pages: list[int],
    zero: list[int] = (),
    *,  # type: ignore[assignment]
    n_pages: int | None = None,
    data: bytes | None = None,
) -> bytes:
    header = {
        "t": "page_batch",
        "slot": slot,
        "round": 0,
        "n_pages": len(pages) if n_pages is None else n_pages,
        "n_zero": len(zero),
    }
    payload = (
        np.array(pages, "<u8").tobytes()
        + np.array(zero, "<u8").tobytes()
        + (bytes(PAGE * len(pages)) if data is None else data)
    )
    return raw_frame(header, payload)


def big_vm_target(**both: object) -> Connection:
    source, target = make_pair(**both)
    handshake(source, target)
    transfer(source, target, description(memory=[(0, 0, 65536 * PAGE), (3, 1 << 40, PAGE)]))
    transfer(target, source, Accept())
    return target


def test_page_index_outside_the_slot() -> None:
    err = refused(big_vm_target(), page_frame(0, [5, 70000, 6]), r"^page index 70000 outside slot 0 \(65536 pages\)$")
    assert isinstance(err.__cause__, LocalProtocolError)


def test_zero_page_index_outside_the_slot() -> None:
    refused(big_vm_target(), page_frame(3, [], [0, 1]), r"zero page index 1 outside slot 3 \(1 pages\)")


def test_unknown_slot() -> None:
    refused(big_vm_target(), page_frame(7, [0]), r"unknown slot 7 \(the VM has slots \[0, 3\]\)")


def test_count_and_length_mismatch() -> None:
    refused(
        big_vm_target(),
        page_frame(0, [1], n_pages=2),
        r"PageBatch payload length 4104 does not match 2 pages \+ 0 zero pages of 4096 bytes "
        r"\(expected 8208\)",
    )


def test_short_data_mismatch() -> None:
    refused(
        big_vm_target(),
        page_frame(0, [1, 2], data=bytes(PAGE)),
        r"PageBatch payload length 4112 does not match 2 pages",
    )


@pytest.mark.parametrize("mode", [{}, {"tls": True}], ids=["sealed", "clear"])
@pytest.mark.parametrize(
    ("n_pages", "n_zero", "match"),
    [
        (1, -1, r"PageBatch n_zero -1 is outside 0\.\.8388608"),
        (-1, 513, r"PageBatch n_pages -1 is outside 0\.\.8388608"),
        (3, -2, r"PageBatch n_zero -2 is outside"),
        (1 << 40, 0, r"PageBatch n_pages 1099511627776 is outside"),
        (0, 0, r"PageBatch n_pages and n_zero are both 0"),
    ],
)
def test_negative_or_inconsistent_counts_are_the_peers_protocol_error(
    mode: dict[str, bool], n_pages: int, n_zero: int, match: str
) -> None:
    """Issue 10: n_zero=-1 was accepted and n_pages=-1 raised a ValueError out of the transport.
    The payload has the length the counts call for, so no length check catches them first."""
    header = {"t": "page_batch", "slot": 0, "round": 0, "n_pages": n_pages, "n_zero": n_zero}
    length = max(0, min(framing.page_payload_len(n_pages, n_zero, PAGE), 1 << 20))
    payload = (np.array([1, 2, 3], "<u8").tobytes() + bytes(length))[:length]
    refused(big_vm_target(**mode), raw_frame(header, payload), match)


def test_empty_batch() -> None:
    refused(big_vm_target(), page_frame(0, []), r"PageBatch n_pages and n_zero are both 0")


def test_page_data_before_accept() -> None:
    refused(
        target_at(State.DESCRIBED),
        page_frame(0, [1]),
        r"from the source: page data \(PageBatch\) before Accept \(state DESCRIBED",
    )


def test_refused_from_the_header_before_the_payload_arrives() -> None:
    """A batch for an unknown slot fails on its header; its payload is never waited for. (Frames
    in the clear, as with tls; a sealed record is bounded by its length bytes instead.)"""
    data = page_frame(7, list(range(100)))
    header_len = 8 + struct.unpack(">I", data[:4])[0]
    refused(big_vm_target(tls=True), data[:header_len], r"unknown slot 7")


def test_batch_over_the_negotiated_max() -> None:
    source = Connection(Role.SOURCE, node="a", psk=b"k" * 16, max_batch_bytes=1 << 20)
    target = Connection(Role.TARGET, node="b", psk=b"k" * 16)
    handshake(source, target)
    transfer(source, target, description())
    transfer(target, source, Accept())
    big = PageBatch(
        slot=0, round=0, pages=np.arange(256, dtype=np.uint64) % 64, zero_pages=u64(), data=bytes(256 * PAGE)
    )
    with pytest.raises(LocalProtocolError, match=r"1050624 exceeds the negotiated max batch 1048576"):
        source.send(big)
    pages = list(range(64)) * 4
    refused(
        target,
        sealed_by(source, page_frame(0, pages)),
        r"PageBatch payload length 1050624 exceeds the negotiated max batch 1048576",
    )


def test_local_batches_are_checked_against_the_layout_too() -> None:
    source, target = drive(State.PAGES)
    with pytest.raises(LocalProtocolError, match=r"page index 64 outside slot 0 \(64 pages\)"):
        source.send(batch(0, [64]))
    with pytest.raises(LocalProtocolError, match=r"unknown slot 9"):
        source.send(batch(9, [0]))
    with pytest.raises(LocalProtocolError, match=r"PageBatch.data holds 100 bytes"):
        PageBatch(slot=0, round=0, pages=u64(1, 2, 3), zero_pages=u64(), data=bytes(100))
    with pytest.raises(LocalProtocolError, match=r"PageBatch.pages must have dtype uint64, got int64"):
        PageBatch(slot=0, round=0, pages=np.array([1]), zero_pages=u64(), data=bytes(PAGE))
    with pytest.raises(LocalProtocolError, match=r"PageBatch.data is 8192 bytes; 1 pages of 4096"):
        source.send(PageBatch(slot=0, round=0, pages=u64(1), zero_pages=u64(), data=bytes(2 * PAGE)))
    assert source.state is State.PAGES and source.pages_transferred == 0


def test_device_state_too_large() -> None:
    """In the clear (tls) it is refused on the header; sealed, once its record opened."""
    refused(
        drive(State.PAGES, tls=True)[1],
        raw_frame({"t": "device_state", "kind": "vcpu0"}, payload_len=(16 << 20) + 1),
        r"DeviceState payload length 16777217 exceeds 16777216",
    )
    refused(
        target_at(State.PAGES),
        raw_frame({"t": "device_state", "kind": "vcpu0"}, bytes((16 << 20) + 1)),
        r"DeviceState payload length 16777217 exceeds 16777216",
    )


def test_done_must_count_the_pages_sent() -> None:
    source, target = drive(State.PAGES)
    transfer(source, target, batch(0, [1, 2], [3]))
    with pytest.raises(LocalProtocolError, match=r"Done.pages_total 5 but this connection carried 3"):
        source.send(Done(5, None, "off"))
    refused(target, encoded(Done(5, None, "off")), r"Done.pages_total 5 but this connection carried 3 page entries")


def test_loaded_digest_must_match_done() -> None:
    source, target = drive(State.PAGES)
    transfer(source, target, Done(0, b"\x01" * 32, "full"))
    with pytest.raises(LocalProtocolError, match=r"Loaded.digest does not match Done.digest"):
        target.send(Loaded(b"\x02" * 32))
    refused(source, encoded(Loaded(b"\x02" * 32)), r"Loaded.digest does not match Done.digest")


def test_query_result_must_answer_the_query() -> None:
    source, target = drive(State.QUERIED)
    refused(
        source,
        encoded(QueryResult("some-other-id", "aborted")),
        r"QueryResult.migration_id 'some-other-id' does not answer Query 'mig-0001'",
    )


def test_invalid_strings_and_choices() -> None:
    refused(
        target_at(State.READY), raw_frame({"t": "abort", "reason": "x\ny"}), r"Abort.reason holds control characters"
    )
    refused(
        drive(State.QUERIED)[0],
        raw_frame({"t": "query_result", "migration_id": MIGRATION_ID, "state": "maybe"}),
        r"QueryResult.state must be one of \['aborted', 'running', 'unknown'\], got 'maybe'",
    )
    refused(
        target_at(State.PAGES),
        raw_frame({"t": "done", "pages_total": 0, "digest": None, "verify": "full"}),
        r'Done.digest is required with verify="full"',
    )


def test_abort_from_any_text() -> None:
    with pytest.raises(LocalProtocolError, match="Abort.reason holds control characters"):
        Abort("line one\nline two")
    assert Abort.from_text("line one\nline two\x1b[0m") == Abort("line one line two [0m")
    assert len(Abort.from_text("x" * 5000).reason) == limits.MAX_REASON_CHARS
    assert Abort.from_text("\n") == Abort("aborted")


def test_events_validate_on_construction() -> None:
    with pytest.raises(LocalProtocolError, match=r"DeviceState.blob must be 0 to 16777216 bytes"):
        DeviceState("vcpu0", bytes((16 << 20) + 1))
    with pytest.raises(LocalProtocolError, match=r"Hello.capabilities must be a set of str"):
        Hello(1, 1, "a", NONCE, "psk", "abc", 8 << 20)  # type: ignore[arg-type]
    with pytest.raises(FrozenInstanceError):
        Abort("x").reason = "y"  # type: ignore[misc]


def test_feeding_without_draining_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "RECEIVE_BUFFER_LIMIT", 1000)
    source, target = make_pair()
    with pytest.raises(LocalProtocolError, match=r"drain next_event\(\) until NEED_DATA"):
        for _ in range(100):
            target.receive_data(b"x" * 100)


def test_receive_after_eof_is_local_misuse() -> None:
    target = target_at(State.START)
    target.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        target.receive_data(b"more")
