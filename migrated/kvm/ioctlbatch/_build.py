"""cffi (API mode) build of migrated.kvm.ioctlbatch._ioctlbatch; run by the package build.

``cffi_modules=["migrated/kvm/ioctlbatch/_build.py:ffibuilder"]``; in place:
``python3 migrated/kvm/ioctlbatch/_build.py``.
"""

import pathlib
import re

from cffi import FFI

_HERE = pathlib.Path(__file__).resolve().parent
_MATCH = re.search(r"/\* cffi-cdef-begin \*/(.*)/\* cffi-cdef-end \*/", (_HERE / "ioctlbatch.h").read_text(), re.S)
assert _MATCH is not None, "ioctlbatch.h lost its cffi-cdef markers"
_CDEF = _MATCH.group(1)


def make_ffibuilder(src_dir: str) -> FFI:
    builder = FFI()
    builder.cdef(_CDEF)
    builder.set_source(
        "migrated.kvm.ioctlbatch._ioctlbatch",
        '#include "ioctlbatch.h"',
        sources=[f"{src_dir}/ioctlbatch.c"],
        include_dirs=[src_dir],
        extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror"],
    )
    return builder


ffibuilder = make_ffibuilder("migrated/kvm/ioctlbatch")

if __name__ == "__main__":
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        built = make_ffibuilder(str(_HERE)).compile(tmpdir=tmp, verbose=False)
        shutil.copy(built, _HERE)
