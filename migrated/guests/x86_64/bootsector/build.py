"""Builds migrated's own boot sector from `boot.S` with GNU as and ld, and sets its parameters.

    python -m migrated.guests.x86_64.bootsector.build OUT.bin [--base ADDR] [--bytes N] [--print-every K]

writes a ready-to-boot image for `migratectl vm create NAME --guest raw --image OUT.bin`.
Nothing here runs at import time; the daemon never builds, it loads the file it is given.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
from pathlib import Path

from ...build import find_tool, run_tool
from . import (
    LOAD_ADDR,
    PARAMS_MAGIC,
    PARAMS_OFFSET,
    PARAMS_VERSION,
    SECTOR_BYTES,
    BootSectorParams,
)

SOURCE = Path(__file__).resolve().parent / "boot.S"
_PARAMS = struct.Struct("<4sIIII")  # magic, version, base, bytes, print_every


class BootSectorBuildError(RuntimeError):
    """The boot sector could not be built (missing tool, assembler or linker error)."""


def _tool(name: str) -> str:
    return find_tool(
        name, "building the boot sector needs GNU as and ld (Debian: apt-get install binutils)", BootSectorBuildError
    )


def _run(argv: list[str]) -> None:
    run_tool(argv, BootSectorBuildError)


def assemble(source: Path = SOURCE) -> bytes:
    """Assemble and link `source` at 0x7c00 into a flat binary; checks it is a boot sector."""
    as_, ld = _tool("as"), _tool("ld")
    with tempfile.TemporaryDirectory(prefix="migrated-bootsector-") as tmp:
        obj, out = Path(tmp) / "boot.o", Path(tmp) / "boot.bin"
        _run([as_, "--32", "-o", str(obj), str(source)])
        _run(
            [
                ld,
                "-m",
                "elf_i386",
                "-Ttext",
                f"{LOAD_ADDR:#x}",
                "-e",
                "_start",
                "--build-id=none",
                "-z",
                "noexecstack",
                "--oformat",
                "binary",
                "-o",
                str(out),
                str(obj),
            ]
        )
        image = out.read_bytes()
    if len(image) != SECTOR_BYTES or image[510:] != b"\x55\xaa":
        raise BootSectorBuildError(
            f"{source.name} assembled to {len(image)} bytes ending in {image[-2:].hex()}: "
            f"a boot sector is {SECTOR_BYTES} bytes ending in 55aa (code too long?)"
        )
    read_params(image)  # the parameter block is where build and source agree
    return image


def read_params(image: bytes) -> BootSectorParams:
    magic, version, base, size, every = _PARAMS.unpack_from(image, PARAMS_OFFSET)
    if magic != PARAMS_MAGIC or version != PARAMS_VERSION:
        raise BootSectorBuildError(
            f"no parameter block (magic {PARAMS_MAGIC!r}, version {PARAMS_VERSION}) at offset "
            f"{PARAMS_OFFSET:#x}: found {magic!r}, version {version}; boot.S and build.py "
            "disagree"
        )
    return BootSectorParams(base=base, bytes=size, print_every=every)


def configure(image: bytes, params: BootSectorParams) -> bytes:
    """A copy of `image` with its parameter block set to `params` (validated)."""
    read_params(image)
    patched = bytearray(image)
    _PARAMS.pack_into(
        patched,
        PARAMS_OFFSET,
        PARAMS_MAGIC,
        PARAMS_VERSION,
        params.base,
        params.bytes,
        params.print_every,
    )
    return bytes(patched)


def build_boot_sector(params: BootSectorParams | None = None) -> bytes:
    """The boot sector, assembled from `boot.S` and set to `params` (the defaults if None)."""
    return configure(assemble(), params or BootSectorParams())


def write_image(path: Path, image: bytes) -> None:
    """Replace `path` atomically, so a concurrent loader never reads half an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.parent / f".{path.name}.{os.getpid()}"
    staged.write_bytes(image)
    os.replace(staged, path)


def _int(text: str) -> int:
    return int(text, 0)


def main(argv: list[str] | None = None) -> int:
    defaults = BootSectorParams()
    parser = argparse.ArgumentParser(
        prog="python -m migrated.guests.x86_64.bootsector.build", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", type=Path, help="where to write the 512-byte image")
    parser.add_argument(
        "--base",
        type=_int,
        default=defaults.base,
        help=f"first byte of the region the guest rewrites (default {defaults.base:#x})",
    )
    parser.add_argument(
        "--bytes", type=_int, default=defaults.bytes, help=f"size of that region (default {defaults.bytes:#x})"
    )
    parser.add_argument(
        "--print-every",
        type=int,
        default=defaults.print_every,
        help=f"print 'pass N' every this many passes (default {defaults.print_every})",
    )
    args = parser.parse_args(argv)
    try:
        params = BootSectorParams(base=args.base, bytes=args.bytes, print_every=args.print_every)
        image = build_boot_sector(params)
        write_image(args.out, image)
    except (ValueError, BootSectorBuildError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"built {args.out} ({len(image)} bytes; region {params.base:#x}+{params.bytes:#x}, "
        f"'pass N' every {params.print_every} passes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
