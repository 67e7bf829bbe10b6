"""Builds the workload guest images from the C sources in `x86_64/` and `aarch64/`.

Called by the package build (setup.py) and by `python -m migrated.guests.build` (in place, both
images), never at import time: the daemon only loads the finished `workload-x86_64.bin` and
`workload-aarch64.bin`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "x86_64"
IMAGE_NAME = "workload-x86_64.bin"
SOURCES = ("start.S", "workload.c")
LINKER_SCRIPT = "workload.ld"

# The guest runs with no SSE state set up and no kernel under it: no red zone, no vector
# registers, no libc, no runtime checks that would need one; a fixed-address non-PIE image.
CFLAGS = (
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
)
LDFLAGS = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,-z,max-page-size=4096",
)


class GuestBuildError(RuntimeError):
    """The guest image could not be built (missing tool, compiler or linker error)."""


def find_tool(name: str, needs: str, error: type[Exception] = GuestBuildError) -> str:
    """The tool's path, or `error` saying that it is missing and what `needs` it."""
    path = shutil.which(name)
    if path is None:
        raise error(f"{name} not found on PATH: {needs}")
    return path


def run_tool(argv: list[str], error: type[Exception] = GuestBuildError) -> None:
    """Run a build step; on failure `error` carries the command and everything it printed."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise error(f"{Path(argv[0]).name} failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout}{proc.stderr}")


def _tool(name: str) -> str:
    return find_tool(name, "building the workload guest needs gcc and binutils (Debian: apt-get install gcc binutils)")


def build_workload(out_dir: Path) -> Path:
    """Compiles and links the guest, writes `out_dir/workload-x86_64.bin`, returns its path.

    The image replaces any older one atomically, so a concurrent loader never reads half of it.
    """
    gcc, objcopy = _tool("gcc"), _tool("objcopy")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / IMAGE_NAME
    with tempfile.TemporaryDirectory(prefix="migrated-guest-") as tmp:
        elf = Path(tmp) / "workload.elf"
        run_tool(
            [gcc, *CFLAGS, *LDFLAGS, f"-I{SOURCE_DIR}", "-T", str(SOURCE_DIR / LINKER_SCRIPT)]
            + [str(SOURCE_DIR / s) for s in SOURCES]
            + ["-o", str(elf)]
        )
        raw = Path(tmp) / IMAGE_NAME
        run_tool([objcopy, "-O", "binary", str(elf), str(raw)])
        staged = out_dir / f".{IMAGE_NAME}.{os.getpid()}"
        shutil.copyfile(raw, staged)
        os.replace(staged, target)
    return target


# ---- arm64 ---------------------------------------------------------------------------------
# Cross-compiled on any host with Debian's gcc-aarch64-linux-gnu. The arm64 guest includes the
# architecture-neutral abi.h and page.h from x86_64/ (one copy of the contract), its own files
# from aarch64/.

AARCH64_SOURCE_DIR = Path(__file__).resolve().parent / "aarch64"
AARCH64_IMAGE_NAME = "workload-aarch64.bin"
AARCH64_SOURCES = ("start.S", "workload.c", "its.c", "lib.c")
AARCH64_CROSS_PREFIX = "aarch64-linux-gnu-"

# Runs at EL1 with no FP/SIMD enabled and no runtime under it: general registers only, no
# out-of-line atomics (libgcc), no branch protection (pointer authentication is not set up),
# no loop-to-memset rewriting (lib.c is the memset), a fixed-address non-PIE image.
AARCH64_CFLAGS = (
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffreestanding",
    "-fno-tree-loop-distribute-patterns",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-march=armv8-a",
    "-mgeneral-regs-only",
    "-mno-outline-atomics",
    "-mbranch-protection=none",
    "-mcmodel=small",
)


def _cross_tool(name: str) -> str:
    return find_tool(
        AARCH64_CROSS_PREFIX + name,
        "building the arm64 workload guest needs the aarch64 cross compiler "
        "(Debian: apt-get install gcc-aarch64-linux-gnu)",
    )


def build_workload_aarch64(out_dir: Path, *, elf_copy: Path | None = None) -> Path:
    """Cross-compiles and links the arm64 guest, writes `out_dir/workload-aarch64.bin`, returns
    its path (replaced atomically, like the x86 image). `elf_copy` also keeps the linked ELF
    there (symbols, for tests and debugging)."""
    gcc, objcopy = _cross_tool("gcc"), _cross_tool("objcopy")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / AARCH64_IMAGE_NAME
    with tempfile.TemporaryDirectory(prefix="migrated-guest-aarch64-") as tmp:
        elf = Path(tmp) / "workload-aarch64.elf"
        run_tool(
            [gcc, *AARCH64_CFLAGS, *LDFLAGS, f"-I{AARCH64_SOURCE_DIR}", f"-I{SOURCE_DIR}"]
            + ["-T", str(AARCH64_SOURCE_DIR / LINKER_SCRIPT)]
            + [str(AARCH64_SOURCE_DIR / s) for s in AARCH64_SOURCES]
            + ["-o", str(elf)]
        )
        raw = Path(tmp) / AARCH64_IMAGE_NAME
        run_tool([objcopy, "-O", "binary", str(elf), str(raw)])
        if elf_copy is not None:
            shutil.copyfile(elf, elf_copy)
        staged = out_dir / f".{AARCH64_IMAGE_NAME}.{os.getpid()}"
        shutil.copyfile(raw, staged)
        os.replace(staged, target)
    return target


def main() -> int:
    here = Path(__file__).resolve().parent
    for build in (build_workload, build_workload_aarch64):
        path = build(here)
        print(f"built {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
