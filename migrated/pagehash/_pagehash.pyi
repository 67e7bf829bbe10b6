# The compiled cffi module (migrated/pagehash/_build.py); see pagehash.h for the C side.
from typing import Any

ffi: Any

class _Lib:
    def ph_abi_version(self) -> int: ...
    def ph_page_hashes(self, base: Any, npages: int, first_pfn: int, out: Any) -> int: ...
    def ph_zero_page_hashes(self, npages: int, first_pfn: int, out: Any) -> int: ...

lib: _Lib
