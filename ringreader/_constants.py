"""Values shared by the wrapper and the pure-Python oracle (no numpy, no C here)."""

from typing import Final

# From <linux/kvm.h>, as documented in api.rst "KVM_CAP_DIRTY_LOG_RING":
# "An entry in the ring buffer can be unused (flag bits 00), dirty (flag bits 01) or harvested
# (flag bits 1X)."
DIRTY_GFN_F_DIRTY: Final = 1
DIRTY_GFN_F_RESET: Final = 2
DIRTY_GFN_F_MASK: Final = 3

DIRTY_GFN_SIZE: Final = 16
"""sizeof(struct kvm_dirty_gfn): u32 flags, u32 slot, u64 offset."""

U32_MASK: Final = 0xFFFF_FFFF
"""Ring indices are u32 in KVM and wrap."""

MAX_RING_ENTRIES: Final = 1 << 31
"""Largest power of two a u32 entry count can hold."""


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
