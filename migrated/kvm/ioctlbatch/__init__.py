"""A fixed sequence of ioctls run in one C call, without the GIL (ioctlbatch.h says why).

Built once with the buffers its calls use (kept alive with it), then run: a failed call raises
KvmIoctlError naming its step, as the one-by-one calls do (`Vcpu.ioctl`); a call that returned
other than its expected result stops the batch there and hands the index back, for the caller
to finish that step its own way (KVM_SET_MSRS stops at the first MSR KVM refuses).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from ..errors import KvmIoctlError
from ._ioctlbatch import ffi, lib

ABI_VERSION = 1
if lib.ib_abi_version() != ABI_VERSION:
    raise ImportError(
        f"migrated.kvm.ioctlbatch: compiled ABI {lib.ib_abi_version()}, sources expect {ABI_VERSION}: "
        "rebuild with `make build`"
    )

ANY_RESULT = lib.IB_ANY_RESULT


class IoctlBatch:
    """Calls added with `add`, run in order by `run`."""

    def __init__(self) -> None:
        self._steps: list[str] = []
        self._buffers: list[Any] = []  # every argument buffer, alive as long as the batch
        self._specs: list[tuple[int, int, int, int]] = []
        self._calls: Any = None

    def add(self, step: str, fd: int, request: int, arg: Any = 0, expect: int = ANY_RESULT) -> int:
        """One ioctl: `arg` an int (passed by value) or a ctypes object (passed by address),
        `step` what an error names (e.g. "vCPU 0: KVM_GET_REGS"). Returns its index."""
        if self._calls is not None:
            raise RuntimeError("the batch ran already: build a new one to add calls")
        if isinstance(arg, int):
            value = arg
        else:
            value = ctypes.addressof(arg)
            self._buffers.append(arg)
        self._steps.append(step)
        self._specs.append((fd, expect, request, value))
        return len(self._specs) - 1

    def __len__(self) -> int:
        return len(self._specs)

    def prepare(self) -> None:
        """The C side's call array, made now (else by the first `run`); no call can be added after."""
        if self._calls is None:
            self._calls = ffi.new("struct ib_call[]", max(len(self._specs), 1))
            for call, (fd, expect, request, value) in zip(self._calls, self._specs):
                call.fd, call.expect, call.request, call.arg = fd, expect, request, value

    def expect(self, index: int, result: int) -> None:
        """From now on call `index` lets the batch go on only when it returns `result` (a call
        whose argument changes from run to run, as a KVM_SET_MSRS whose count does)."""
        if not 0 <= index < len(self._specs):
            raise ValueError(f"call {index} outside the batch of {len(self._specs)} calls")
        fd, expected, request, value = self._specs[index]
        if expected == result:
            return  # unchanged: no cold cffi write in a downtime
        self._specs[index] = (fd, result, request, value)
        if self._calls is not None:
            self._calls[index].expect = result

    def run(self, start: int = 0) -> int:
        """Run the calls from `start` on; returns the index of a call that returned other than
        expected (its `result`), or len(self) when every call was as expected."""
        self.prepare()
        if not 0 <= start <= len(self._specs):
            raise ValueError(f"start {start} outside the batch of {len(self._specs)} calls")
        if start == len(self._specs):
            return start
        stopped = start + int(lib.ib_run(self._calls + start, len(self._specs) - start))
        if stopped < len(self._specs):
            result = int(self._calls[stopped].result)
            if result < 0:
                raise KvmIoctlError(self._steps[stopped], OSError(-result, os.strerror(-result)))
        return stopped

    def result(self, index: int) -> int:
        """What call `index` returned when it last ran."""
        if self._calls is None:
            raise RuntimeError("the batch has not run")
        return int(self._calls[index].result)
