"""Optional fields (Done.rounds, Loaded's costs, VmDescription.verify): sent to a peer that
negotiated them, absent from an older peer's frames without harm, type-checked like every other
field."""

from __future__ import annotations

import re
from dataclasses import replace

import msgpack  # type: ignore[import-untyped]
import pytest
from tr_helpers import description, description_header, drive, feed, raw_frame, split_frames, transfer

from transport import Close, Commit, Done, Loaded, RemoteProtocolError, Running, State, VmDescription, framing


def test_rounds_and_the_targets_costs_reach_the_peer() -> None:
    source, target = drive(State.DEVICE_STATE)
    [done] = transfer(source, target, Done(source.pages_transferred, None, "off", rounds=3))
    assert isinstance(done, Done) and done.rounds == 3
    [loaded] = transfer(target, source, Loaded(None, digest_us=12_500, load_us=31_000))
    assert isinstance(loaded, Loaded) and (loaded.digest_us, loaded.load_us) == (12_500, 31_000)


@pytest.mark.parametrize("verify", ["full", "off", None])
def test_the_description_says_the_verify_mode_ahead(verify: str | None) -> None:
    source, target = drive(State.READY)
    [described] = transfer(source, target, description(verify=verify))
    assert isinstance(described, VmDescription) and described.verify == verify
    assert target.state is State.DESCRIBED


def test_a_description_without_verify_still_decodes() -> None:
    """As an older source writes it: no `verify`, so the target digests after Done as before."""
    _, buffers = framing.encode(description(), optional_fields=False)
    assert "verify" not in _header(bytes(buffers[0]))
    _, buffers = framing.encode(description(verify="full"), optional_fields=False)
    assert "verify" not in _header(bytes(buffers[0]))
    _, buffers = framing.encode(description(verify="full"))
    assert _header(bytes(buffers[0]))["verify"] == "full"


def test_the_sources_close_carries_its_timing() -> None:
    source, target = drive(State.DONE)
    [close] = transfer(source, target, Close(downtime_us=48_000, total_us=2_500_000))
    assert isinstance(close, Close) and (close.downtime_us, close.total_us) == (48_000, 2_500_000)
    [close] = transfer(target, source, Close())
    assert isinstance(close, Close) and close.downtime_us is None and source.state is State.CLOSED


def test_running_carries_the_targets_resume_timing_and_close_the_guest_downtime() -> None:
    source, target = drive(State.LOADED)
    transfer(source, target, Commit())
    [running] = transfer(target, source, Running(resume_us=40, reply_us=310))
    assert isinstance(running, Running) and (running.resume_us, running.reply_us) == (40, 310)
    [close] = transfer(source, target, Close(downtime_us=9_000, guest_downtime_us=8_700))
    assert isinstance(close, Close) and close.guest_downtime_us == 8_700


def test_a_running_without_timing_still_decodes() -> None:
    """A bare RUNNING as an older target writes it."""
    source, target = drive(State.LOADED)
    transfer(source, target, Commit())
    [running] = feed(source, raw_frame({"t": "running"}))
    assert isinstance(running, Running) and running.resume_us is None and running.reply_us is None


def test_a_done_without_rounds_still_decodes() -> None:
    """A hand-built DONE as an older source writes it: no `rounds`."""
    source, target = drive(State.DEVICE_STATE)
    header = {"t": "done", "pages_total": target.pages_transferred, "digest": None, "verify": "off"}
    [done] = feed(target, raw_frame(header))
    assert isinstance(done, Done) and done.rounds is None
    assert target.state is State.LOADING
    source, _ = drive(State.LOADING)
    [loaded] = feed(source, raw_frame({"t": "loaded", "digest": None}))
    assert isinstance(loaded, Loaded) and loaded.digest_us is None and loaded.load_us is None


def _header(frame: bytes) -> dict[str, object]:
    header_len = int.from_bytes(frame[:4], "big")
    decoded: dict[str, object] = msgpack.unpackb(frame[8 : 8 + header_len])
    return decoded


def test_an_older_peer_gets_frames_without_them() -> None:
    """A peer whose Hello does not offer OPTIONAL_FIELDS (an older release) would refuse a field
    it does not know: it never sees one."""
    source, target = drive(State.START)
    # What an older release's Hello offers: no optional fields.
    target._hello_template = replace(target._hello_template, capabilities=frozenset())  # type: ignore[misc]
    for make in (source.make_hello, target.make_hello, source.make_auth, target.make_auth):
        sender, receiver = (source, target) if make.__self__ is source else (target, source)
        transfer(sender, receiver, make())
    assert source.negotiated is not None and framing.OPTIONAL_FIELDS not in source.negotiated.capabilities
    _, buffers = framing.encode(Done(0, None, "off", rounds=3), optional_fields=False)
    assert "rounds" not in _header(bytes(buffers[0]))
    _, buffers = framing.encode(Done(0, None, "off", rounds=3))
    assert _header(bytes(buffers[0]))["rounds"] == 3
    assert len(split_frames(bytes(buffers[0]))) == 1


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (
            {"t": "done", "pages_total": 0, "digest": None, "verify": "off", "rounds": "3"},
            "'rounds' must be int, got str",
        ),
        ({"t": "done", "pages_total": 0, "digest": None, "verify": "off", "rounds": -1}, "Done.rounds"),
        ({"t": "loaded", "digest": None, "load_us": 1.5}, "'load_us' must be int, got float"),
        ({"t": "loaded", "digest": None, "digest_us": 1 << 40}, "Loaded.digest_us"),
        ({"t": "running", "resume_us": -1}, "Running.resume_us"),
        ({"t": "running", "reply_us": 2.5}, "'reply_us' must be int, got float"),
        (description_header(verify=1), "'verify' must be str, got int"),
        (description_header(verify="sometimes"), "VmDescription.verify"),
    ],
)
def test_optional_fields_are_checked(header: dict[str, object], match: str) -> None:
    with pytest.raises(Exception, match=re.escape(match)):
        wire, fields = framing.decode_header(msgpack.packb(header, use_bin_type=True))
        framing.build_event(wire, fields, None)


def test_a_peer_sending_a_bad_optional_field_is_refused() -> None:
    source, target = drive(State.DEVICE_STATE)
    header = {"t": "done", "pages_total": target.pages_transferred, "digest": None, "verify": "off", "rounds": True}
    with pytest.raises(RemoteProtocolError, match="'rounds' must be int, got bool"):
        feed(target, raw_frame(header))
