"""The one loader of the workload guest images, for both architectures.

The images are built from source by the package build (`guests/build.py`, from `x86_64/` and
`aarch64/`) into this directory, never at import time: a missing image is a clear error that
says how to build it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .build import AARCH64_IMAGE_NAME, IMAGE_NAME

GUESTS_DIR = Path(__file__).resolve().parent


class GuestImageMissingError(FileNotFoundError):
    """The workload image was not built (it is made by the package build, not at import)."""


@dataclass(frozen=True)
class GuestImage:
    name: str  # the file name the build writes
    what: str  # for messages: "workload guest image", "arm64 workload guest image"
    how_to_build: str  # what the operator runs when it is missing
    directory: Path = GUESTS_DIR

    @property
    def path(self) -> Path:
        return self.directory / self.name

    def at(self, directory: Path) -> GuestImage:
        """The same image, built into another directory (tests build their own)."""
        return dataclasses.replace(self, directory=directory)

    def load(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise GuestImageMissingError(f"{self.what} {self.path} is missing: {self.how_to_build}") from None


X86_64_WORKLOAD = GuestImage(
    IMAGE_NAME,
    "workload guest image",
    "run `make build` (or `python -m migrated.guests.build`) to compile it from migrated/guests/x86_64/",
)
AARCH64_WORKLOAD = GuestImage(
    AARCH64_IMAGE_NAME,
    "arm64 workload guest image",
    "run `python -m migrated.guests.build` (needs aarch64-linux-gnu-gcc) to compile it from migrated/guests/aarch64/",
)
