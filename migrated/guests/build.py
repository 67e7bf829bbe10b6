"""Builds the workload guest image from the C sources in `x86_64/`.

Called by the package build (setup.py) and by `python -m migrated.guests.build` (in place), never
at import time: the daemon only loads the finished `workload-x86_64.bin`.
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


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(
            f"{name} not found on PATH: building the workload guest needs gcc and binutils "
            "(Debian: apt-get install gcc binutils)"
        )
    return path


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{Path(argv[0]).name} failed ({proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stdout}{proc.stderr}"
        )


def build_workload(out_dir: Path) -> Path:
    """Compiles and links the guest, writes `out_dir/workload-x86_64.bin`, returns its path.

    The image replaces any older one atomically, so a concurrent loader never reads half of it.
    """
    gcc, objcopy = _tool("gcc"), _tool("objcopy")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / IMAGE_NAME
    with tempfile.TemporaryDirectory(prefix="migrated-guest-") as tmp:
        elf = Path(tmp) / "workload.elf"
        _run(
            [gcc, *CFLAGS, *LDFLAGS, f"-I{SOURCE_DIR}", "-T", str(SOURCE_DIR / LINKER_SCRIPT)]
            + [str(SOURCE_DIR / s) for s in SOURCES]
            + ["-o", str(elf)]
        )
        raw = Path(tmp) / IMAGE_NAME
        _run([objcopy, "-O", "binary", str(elf), str(raw)])
        staged = out_dir / f".{IMAGE_NAME}.{os.getpid()}"
        shutil.copyfile(raw, staged)
        os.replace(staged, target)
    return target


def main() -> int:
    path = build_workload(Path(__file__).resolve().parent)
    print(f"built {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
