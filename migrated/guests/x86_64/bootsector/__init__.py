"""migrated's own boot sector (`boot.S`): what it writes where, and how to check it from outside.

The guest rewrites [base, base + bytes) forever; pass p stores  a + p * PASS_KEY  (mod 2^32) into
the word at address a, and the number of completed passes lives at PASSES_ADDR. `check_region`
reads a paused guest's RAM and says whether every word is where the loop says it must be: pass
P + 1 below the loop's pointer, pass P above it (P = the count at PASSES_ADDR).

`build.py` assembles the source and patches the parameter block; keep the constants here in step
with `boot.S` (the build checks the block's magic and version).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

LOAD_ADDR = 0x7C00
SECTOR_BYTES = 512
PASSES_ADDR = 0x500  # u32: passes completed
PASS_KEY = 0x9E3779B1  # odd, so invertible mod 2^32
PASS_KEY_INVERSE = pow(PASS_KEY, -1, 1 << 32)
PARAMS_OFFSET = 0x1A0
PARAMS_MAGIC = b"MGBS"
PARAMS_VERSION = 1
BANNER = b"migrated boot sector\n"
PM_BANNER = b"protected mode\n"
# The region must leave alone what the sector itself uses: the pass counter, its stack (below
# 0x7c00) and its code (0x7c00-0x7e00); the guest addresses it with 32-bit registers.
REGION_MIN = LOAD_ADDR + SECTOR_BYTES
REGION_LIMIT = 1 << 32


@dataclass(frozen=True)
class BootSectorParams:
    """The patchable parameters of the boot sector; validated on construction."""

    base: int = 0x100000
    bytes: int = 0x100000
    print_every: int = 1

    def __post_init__(self) -> None:
        for name in ("base", "bytes", "print_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"boot sector {name} {value!r}: an integer")
        if self.base % 16 or self.base < REGION_MIN:
            raise ValueError(
                f"boot sector region base {self.base:#x}: 16-byte aligned and at or above "
                f"{REGION_MIN:#x} (below it live the pass counter, the stack and the sector)"
            )
        if self.bytes <= 0 or self.bytes % 16:
            raise ValueError(f"boot sector region size {self.bytes}: a positive multiple of 16")
        if self.end > REGION_LIMIT:
            raise ValueError(
                f"boot sector region {self.base:#x}+{self.bytes:#x} ends above 4 GiB: the guest "
                "runs in 32-bit protected mode"
            )
        if not 1 <= self.print_every < 1 << 32:
            raise ValueError(f"boot sector print_every {self.print_every}: from 1 to 2^32-1")

    @property
    def end(self) -> int:
        return self.base + self.bytes

    def check_fits(self, memory_bytes: int) -> None:
        if self.end > memory_bytes:
            raise ValueError(
                f"boot sector region {self.base:#x}-{self.end:#x} does not fit in {memory_bytes >> 20} MiB of RAM"
            )


def pass_numbers(words: npt.NDArray[np.uint32], base: int) -> npt.NDArray[np.uint32]:
    """Which pass wrote each word of the region starting at `base` (mod 2^32 arithmetic)."""
    addresses = (np.uint32(base) + np.arange(words.size, dtype=np.uint32) * np.uint32(4)).astype(np.uint32)
    diff = words.astype(np.uint32) - addresses
    return (diff * np.uint32(PASS_KEY_INVERSE)).astype(np.uint32)


def expected_words(base: int, count: int, pass_number: int) -> npt.NDArray[np.uint32]:
    """What pass `pass_number` writes into `count` words from `base`."""
    addresses = np.uint32(base) + np.arange(count, dtype=np.uint32) * np.uint32(4)
    return (addresses + np.uint32((pass_number * PASS_KEY) & 0xFFFFFFFF)).astype(np.uint32)


@dataclass(frozen=True)
class RegionCheck:
    passes_done: int  # the count at PASSES_ADDR
    newer_words: int  # words of pass passes_done + 1 (the pass in progress), all at the bottom
    older_words: int  # words of pass passes_done, all above those
    bad_words: int  # words that fit neither, or a newer word above an older one
    first_bad: int | None  # guest-physical address of the first bad word

    @property
    def ok(self) -> bool:
        return self.bad_words == 0


def passes_done(ram: npt.NDArray[np.uint8]) -> int:
    return int(ram[PASSES_ADDR : PASSES_ADDR + 4].view(np.uint32)[0])


def check_region(ram: npt.NDArray[np.uint8], params: BootSectorParams) -> RegionCheck:
    """Check the region in `ram` (all guest RAM, guest-physical 0 at index 0) of a paused guest.

    Before the first pass completes, words still zero count as "older" (pass 0, never written).
    """
    done = passes_done(ram)
    words = ram[params.base : params.end].view(np.uint32)
    passes = pass_numbers(words, params.base)
    newer = passes == np.uint32((done + 1) & 0xFFFFFFFF)
    older = passes == np.uint32(done & 0xFFFFFFFF)
    if done == 0:
        older |= words == 0
    # The loop walks upwards: every newer word lies below every older one. The pass in progress
    # ends at the first word that is not newer; any newer word above it is misplaced.
    boundary = int(np.argmin(newer)) if not newer.all() else newer.size
    bad = ~(newer | older)
    bad[boundary:] |= newer[boundary:]
    n_bad = int(np.count_nonzero(bad))
    return RegionCheck(
        passes_done=done,
        newer_words=boundary,
        older_words=int(np.count_nonzero(older)),
        bad_words=n_bad,
        first_bad=params.base + 4 * int(np.argmax(bad)) if n_bad else None,
    )
