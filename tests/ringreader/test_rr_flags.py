"""The dirty ring's flag values are defined once, in ringreader/_constants.py; uapi.py takes them
from there, and the C shim's header mirrors them. This checks all three against <linux/kvm.h>,
as the C compiler reads it, and against what the built extension was compiled with."""

from __future__ import annotations

import pathlib
import subprocess

import ringreader
from ringreader._shim import ffi, lib

from migrated.kvm import uapi

PACKAGE = pathlib.Path(ringreader.__file__).parent
NAMES = ("DIRTY_GFN_F_DIRTY", "DIRTY_GFN_F_RESET", "DIRTY_GFN_F_MASK")

PROGRAM = r"""
#include <stdio.h>
#include <linux/kvm.h>
#include "ringreader.h"
int main(void) {
    printf("%lu %lu %lu %lu %lu %lu %lu\n",
           (unsigned long)KVM_DIRTY_GFN_F_DIRTY, (unsigned long)KVM_DIRTY_GFN_F_RESET,
           (unsigned long)KVM_DIRTY_GFN_F_MASK, (unsigned long)sizeof(struct kvm_dirty_gfn),
           (unsigned long)RR_DIRTY_GFN_F_DIRTY, (unsigned long)RR_DIRTY_GFN_F_RESET,
           (unsigned long)RR_DIRTY_GFN_F_MASK);
    return 0;
}
"""


def test_uapi_takes_the_flags_from_ringreader() -> None:
    for name in NAMES:
        assert getattr(uapi, "KVM_" + name) is getattr(ringreader, name), name


def test_kernel_header_shim_header_and_python_agree(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "flags.c"
    source.write_text(PROGRAM)
    binary = tmp_path / "flags"
    subprocess.run(["gcc", "-I", str(PACKAGE), "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split()
    kernel = tuple(int(v) for v in out[:3])
    gfn_size = int(out[3])
    shim_header = tuple(int(v) for v in out[4:])
    python = tuple(getattr(ringreader, name) for name in NAMES)
    assert kernel == python == shim_header, (kernel, python, shim_header)
    assert gfn_size == ringreader.DIRTY_GFN_SIZE


def test_built_extension_agrees() -> None:
    compiled = (lib.RR_DIRTY_GFN_F_DIRTY, lib.RR_DIRTY_GFN_F_RESET, lib.RR_DIRTY_GFN_F_MASK)
    assert compiled == tuple(getattr(ringreader, name) for name in NAMES)
    assert ffi.sizeof("struct rr_dirty_gfn") == ringreader.DIRTY_GFN_SIZE
