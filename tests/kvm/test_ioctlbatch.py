"""migrated.kvm.ioctlbatch: a sequence of ioctls in one C call. Real ioctls on pipes (FIONREAD),
so these run on any Linux host; the x86 state tests run it against KVM (test_x86_state.py)."""

from __future__ import annotations

import ctypes
import errno
import os
import termios
from collections.abc import Iterator

import pytest

from migrated.kvm.errors import KvmIoctlError
from migrated.kvm.ioctlbatch import IoctlBatch


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    try:
        yield read_end, write_end
    finally:
        os.close(read_end)
        os.close(write_end)


def test_calls_run_in_order_into_their_buffers(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, b"hello")
    first, second = ctypes.c_int(-1), ctypes.c_int(-1)
    batch = IoctlBatch()
    batch.add("first FIONREAD", read_end, termios.FIONREAD, first)
    batch.add("second FIONREAD", read_end, termios.FIONREAD, second)
    assert len(batch) == 2
    assert batch.run() == 2
    assert (first.value, second.value) == (5, 5)
    assert batch.result(0) == 0
    os.write(write_end, b"!")
    assert batch.run() == 2  # a batch runs again, into the same buffers
    assert second.value == 6


def test_a_failed_call_stops_the_batch_and_names_its_step(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    closed_read, closed_write = os.pipe()
    os.close(closed_read)
    os.close(closed_write)
    before, after = ctypes.c_int(-1), ctypes.c_int(-1)
    batch = IoctlBatch()
    batch.add("before", read_end, termios.FIONREAD, before)
    batch.add("vCPU 3: KVM_SET_NOTHING", closed_read, termios.FIONREAD, ctypes.c_int())
    batch.add("after", read_end, termios.FIONREAD, after)
    with pytest.raises(KvmIoctlError, match=r"vCPU 3: KVM_SET_NOTHING failed: .* \(errno 9\)") as caught:
        batch.run()
    assert caught.value.errno == errno.EBADF
    assert before.value == 0 and after.value == -1  # nothing after the failure ran
    assert batch.result(1) == -errno.EBADF


def test_an_unexpected_result_hands_the_index_back_and_the_rest_runs_on_request(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, b"abc")
    counts = [ctypes.c_int(-1) for _ in range(3)]
    batch = IoctlBatch()
    for index, count in enumerate(counts):
        # FIONREAD returns 0: the middle call expects 7, as KVM_SET_MSRS expects its count.
        batch.add(f"call {index}", read_end, termios.FIONREAD, count, expect=7 if index == 1 else -1)
    assert batch.run() == 1
    assert [c.value for c in counts] == [3, 3, -1]
    assert batch.result(1) == 0
    assert batch.run(2) == 3
    assert counts[2].value == 3


def test_an_expected_result_can_change_between_runs(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, b"abc")
    counts = [ctypes.c_int(-1) for _ in range(2)]
    batch = IoctlBatch()
    first = batch.add("call 0", read_end, termios.FIONREAD, counts[0], expect=7)
    batch.add("call 1", read_end, termios.FIONREAD, counts[1])
    assert batch.run() == 0  # FIONREAD returns 0, not 7
    batch.expect(first, 0)  # as a KVM_SET_MSRS whose count changed
    assert batch.run() == 2
    assert [c.value for c in counts] == [3, 3]
    batch.expect(first, 1)
    assert batch.run() == 0
    with pytest.raises(ValueError, match="call 2 outside the batch of 2 calls"):
        batch.expect(2, 0)


def test_misuse_is_refused(pipe: tuple[int, int]) -> None:
    read_end, _ = pipe
    batch = IoctlBatch()
    batch.add("one", read_end, termios.FIONREAD, ctypes.c_int())
    with pytest.raises(RuntimeError, match="has not run"):
        batch.result(0)
    with pytest.raises(ValueError, match="start 2 outside the batch of 1 calls"):
        batch.run(2)
    assert batch.run(1) == 1  # nothing left to run
    with pytest.raises(RuntimeError, match="ran already"):
        batch.add("two", read_end, termios.FIONREAD, ctypes.c_int())
