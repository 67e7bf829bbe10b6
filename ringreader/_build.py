"""cffi (API mode) build script for ringreader._ringreader.

Packaging runs it through ``cffi_modules=["ringreader/_build.py:ffibuilder"]`` from the repository
root. For a local in-place build: ``cd <repo> && python3 ringreader/_build.py``.
"""

import pathlib
import re

from cffi import FFI  # type: ignore[import-untyped, unused-ignore]

_HERE = pathlib.Path(__file__).resolve().parent
_HEADER = (_HERE / "ringreader.h").read_text()
# Only the marked block: cffi's parser takes declarations, not include guards or #include.
_MARKED = re.search(r"/\* cffi-cdef-begin \*/(.*)/\* cffi-cdef-end \*/", _HEADER, re.S)
assert _MARKED is not None, "ringreader.h lost its cffi-cdef markers"
_CDEF = _MARKED.group(1)


def make_ffibuilder(src_dir: str) -> FFI:
    builder = FFI()
    builder.cdef(_CDEF)
    builder.set_source(
        "ringreader._ringreader",
        '#include "ringreader.h"',
        sources=[f"{src_dir}/ringreader.c"],
        include_dirs=[src_dir],
        extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror"],
    )
    return builder


# setuptools builds from the repository root, so the paths stay relative (portable sdists).
ffibuilder = make_ffibuilder("ringreader")

if __name__ == "__main__":
    import shutil
    import tempfile

    # cffi compiles from inside tmpdir: give it absolute paths, then drop the extension next to
    # the sources so `import ringreader` from the repository root finds it.
    with tempfile.TemporaryDirectory() as tmp:
        built = make_ffibuilder(str(_HERE)).compile(tmpdir=tmp, verbose=True)
        shutil.copy(built, _HERE)
        print("installed", _HERE / pathlib.Path(built).name)
