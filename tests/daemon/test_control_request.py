"""The control-request parser (migrated/control_request.py): bounds before decoding, one error
type out, and for every input either a checked request or a refusal (DESIGN 6)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrated.control_request import (
    MAX_COMMAND_CHARS,
    MAX_DEPTH,
    MAX_INTEGER_DIGITS,
    MAX_REQUEST_BYTES,
    ControlRequest,
    RequestRefused,
    parse_request,
)


def line(message: Any) -> bytes:
    return json.dumps(message).encode()


# ---- what once ended the daemon (issue 10) ------------------------------------------------

KILLERS = {
    "a JSON integer of 5,000 digits": (b"1" * 5000, f"more than {MAX_INTEGER_DIGITS} digits"),
    "an argument of 5,000 digits": (
        b'{"cmd": "vm.show", "args": {"name": ' + b"9" * 5000 + b"}}",
        f"more than {MAX_INTEGER_DIGITS} digits",
    ),
    "100,000 nested [": (b"[" * 100_000, "nested 100000 levels deep"),
    "100,000 nested { in args": (b'{"cmd": "x", "args": ' + b'{"a": ' * 100_000, "levels deep"),
    "nested one level too deep": (
        b'{"cmd": "x", "args": {"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}}",
        f"nested {MAX_DEPTH + 1} levels deep",
    ),
}


@pytest.mark.parametrize("label", KILLERS)
def test_input_that_crashed_the_decoder_is_refused_with_its_reason(label: str) -> None:
    data, words = KILLERS[label]
    with pytest.raises(RequestRefused, match=words):
        parse_request(data)


def test_the_bounds_are_the_only_thing_between_the_decoder_and_a_crash() -> None:
    """Precondition of the killers above: without the bounds, json.loads itself raises the very
    exceptions that used to escape (so the tests above would fail on the old parser)."""
    with pytest.raises(ValueError, match="digits"):
        json.loads(b"1" * 5000)
    with pytest.raises(RecursionError):
        json.loads(b"[" * 100_000)


def test_nesting_at_the_bound_is_accepted() -> None:
    deep = "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2)
    request = parse_request(b'{"cmd": "x", "args": {"a": ' + deep.encode() + b"}}")
    assert request.args == {"a": json.loads(deep)}


def test_brackets_and_digits_inside_strings_are_text() -> None:
    text = "[" * 1000 + "7" * 1000 + '\\"{'
    request = parse_request(line({"cmd": "vm.show", "args": {"name": text}}))
    assert request == ControlRequest("vm.show", {"name": text})


def test_integer_of_the_longest_allowed_length_is_kept_exactly() -> None:
    number = int("9" * MAX_INTEGER_DIGITS)
    assert parse_request(line({"cmd": "x", "args": {"n": number}})).args == {"n": number}


def test_nan_and_infinity_reach_the_handlers_which_name_them() -> None:
    request = parse_request(b'{"cmd": "vm.set", "args": {"r": NaN, "m": Infinity}}')
    assert request.args["m"] == float("inf") and request.args["r"] != request.args["r"]


SHAPES = {
    "not JSON": (b"vm.list please", "request is not JSON"),
    "invalid UTF-8": (b'\xff{"cmd": "vm.list"}', "not UTF-8 at byte 0"),
    "an empty line": (b"", "request is not JSON"),
    "an unterminated string of escapes": (b'"' + b'\\"' * 1000, "request is not JSON"),
    "a JSON array": (b'["vm.list"]', 'JSON object with a string "cmd"'),
    "a cmd that is a number": (b'{"cmd": 42}', 'JSON object with a string "cmd"'),
    "args that are a list": (b'{"cmd": "vm.show", "args": []}', '"args" must be a JSON object'),
    "an unknown top-level key": (b'{"cmd": "vm.list", "sudo": true}', "unknown keys ['sudo']"),
    "a command with a newline": (line({"cmd": "vm.list\n"}), "command 'vm.list\\n'"),
    "a command too long": (line({"cmd": "v" * (MAX_COMMAND_CHARS + 1)}), f"at most {MAX_COMMAND_CHARS}"),
    "over 1 MiB": (b" " * (MAX_REQUEST_BYTES + 1), "request longer than 1 MiB"),
}


@pytest.mark.parametrize("label", SHAPES)
def test_malformed_shape_is_refused_naming_the_problem(label: str) -> None:
    data, words = SHAPES[label]
    with pytest.raises(RequestRefused) as refused:
        parse_request(data)
    assert words in str(refused.value)


def test_a_valid_request_comes_back_whole() -> None:
    args = {"name": "web", "memory_mib": 64, "to": "[::1]:7890", "verify": "off", "pad": "x" * 100}
    assert parse_request(line({"cmd": "vm.create", "args": args})) == ControlRequest("vm.create", args)
    assert parse_request(line({"cmd": "vm.list"})) == ControlRequest("vm.list", {})


# ---- properties ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
commands = st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(cmd=commands, args=st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_every_well_formed_request_round_trips(cmd: str, args: dict[str, Any]) -> None:
    assert parse_request(line({"cmd": cmd, "args": args})) == ControlRequest(cmd, args)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=2000) | st.text(alphabet='[]{}"\\0123456789:,. nul', max_size=3000).map(str.encode))
def test_any_bytes_give_a_request_or_a_refusal_never_another_exception(data: bytes) -> None:
    try:
        request = parse_request(data)
    except RequestRefused as err:
        assert str(err)
        return
    assert isinstance(request.args, dict) and 0 < len(request.cmd) <= MAX_COMMAND_CHARS


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(min_value=1, max_value=3 * MAX_DEPTH), opener=st.sampled_from(["[", '{"k": ']))
def test_depth_is_refused_exactly_past_the_bound(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "0" + closer * depth
    data = ('{"cmd": "x", "args": {"a": ' + nested + "}}").encode()
    if depth + 2 <= MAX_DEPTH:
        assert parse_request(data).cmd == "x"
    else:
        with pytest.raises(RequestRefused, match="levels deep"):
            parse_request(data)
