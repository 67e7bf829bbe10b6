"""Emits the C of one of the repository's cffi API-mode extensions, for cross-compiling.

Usage: python3.11 cffi_emit.py CFFI_DIR REPO BUILD_SCRIPT OUT_DIR

CFFI_DIR holds the cffi package to generate with (Debian's amd64 python3-cffi, the same release
as the guest's python3-cffi-backend), put first on sys.path here so that no other cffi (the
virtualenv's, the system's) is picked up. BUILD_SCRIPT (e.g. ringreader/_build.py, relative to
REPO) must define make_ffibuilder(src_dir), as the repository's build scripts do; it is called with
the absolute source directory, so the flags and sources here are always those the package build
uses.

Writes OUT_DIR/<module>.c and prints one JSON object: module (dotted name), c (that file),
sources, include_dirs, extra_compile_args, define_macros. The caller compiles them; cffi's own
compile step would use the host's compiler settings and name the file for the host.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys


def main() -> None:
    cffi_dir, repo, build_script, out_dir = sys.argv[1:5]
    sys.path.insert(0, cffi_dir)
    import cffi  # noqa: E402  (after the path change, on purpose)

    if not os.path.realpath(cffi.__file__).startswith(os.path.realpath(cffi_dir) + os.sep):
        raise SystemExit(f"cffi_emit: cffi came from {cffi.__file__}, not from {cffi_dir}")

    path = os.path.join(repo, build_script)
    spec = importlib.util.spec_from_file_location("_lane_cffi_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    src_dir = os.path.dirname(os.path.abspath(path))
    builder = module.make_ffibuilder(src_dir)

    # set_source() keeps (module name, source, source extension, keywords) here; cffi's own
    # setuptools integration reads the same attribute.
    name, _source, _ext, kwds = builder._assigned_source
    c_file = os.path.join(out_dir, name + ".c")
    with contextlib.redirect_stdout(sys.stderr):  # cffi says "generating ..." on stdout
        builder.emit_c_code(c_file)
    print(
        json.dumps(
            {
                "cffi": cffi.__version__,
                "module": name,
                "c": c_file,
                "sources": [os.path.join(repo, s) for s in kwds.get("sources", [])],
                "include_dirs": [os.path.join(repo, d) for d in kwds.get("include_dirs", [])],
                "extra_compile_args": list(kwds.get("extra_compile_args", [])),
                "define_macros": [list(m) for m in kwds.get("define_macros", [])],
            }
        )
    )


if __name__ == "__main__":
    main()
