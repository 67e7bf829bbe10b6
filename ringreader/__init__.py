"""ringreader: harvest KVM dirty rings and deduplicate what they yield, in a small C shim.

Knows neither trio nor the migration protocol (DESIGN.md, STYLE.md): only numpy, cffi and the
ring layout from Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING".
"""

from ._args import RingBuffer as RingBuffer
from ._constants import DIRTY_GFN_F_DIRTY as DIRTY_GFN_F_DIRTY
from ._constants import DIRTY_GFN_F_MASK as DIRTY_GFN_F_MASK
from ._constants import DIRTY_GFN_F_RESET as DIRTY_GFN_F_RESET
from ._constants import DIRTY_GFN_SIZE as DIRTY_GFN_SIZE
from ._dedup import DirtyDedup as DirtyDedup
from ._harvest import DIRTY_GFN_DTYPE as DIRTY_GFN_DTYPE
from ._harvest import bitmap_to_pages as bitmap_to_pages
from ._harvest import harvest as harvest
from ._shim import EXPECTED_ABI_VERSION as ABI_VERSION
from ._shim import RingReaderError as RingReaderError
from ._wait import RingWaiter as RingWaiter

__all__ = [
    "ABI_VERSION",
    "DIRTY_GFN_DTYPE",
    "DIRTY_GFN_F_DIRTY",
    "DIRTY_GFN_F_MASK",
    "DIRTY_GFN_F_RESET",
    "DIRTY_GFN_SIZE",
    "DirtyDedup",
    "RingBuffer",
    "RingReaderError",
    "RingWaiter",
    "bitmap_to_pages",
    "harvest",
]
