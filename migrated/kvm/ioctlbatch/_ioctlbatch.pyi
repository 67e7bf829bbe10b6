# The compiled cffi module (migrated/kvm/ioctlbatch/_build.py); see ioctlbatch.h for the C side.
from typing import Any

ffi: Any

class _Lib:
    IB_ANY_RESULT: int
    def ib_abi_version(self) -> int: ...
    def ib_run(self, calls: Any, n: int) -> int: ...

lib: _Lib
