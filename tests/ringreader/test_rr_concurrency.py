"""A Python producer thread plays KVM while the main thread harvests and resets.

cffi drops the GIL around rr_harvest, so the two can overlap; either way the test exercises
resuming from the saved fetch index across u32 wraparound with a ring that keeps filling up.
"""

from __future__ import annotations

import threading
import time

import numpy as np

import ringreader
from ringreader import DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET

N_ENTRIES = 64
TOTAL = 20_000
START = 2**32 - 1_000  # wraps after 1,000 entries
MASK = N_ENTRIES - 1


def _produce(ring: np.ndarray, stop: threading.Event) -> None:
    flags, slots, offsets = ring["flags"], ring["slot"], ring["offset"]
    for seq in range(TOTAL):
        entry = (START + seq) & MASK
        # KVM reuses an entry only after KVM_RESET_DIRTY_RINGS returned it to 00b.
        while flags[entry] != 0:
            if stop.is_set():
                return
            time.sleep(0)
        slots[entry] = seq % 7
        offsets[entry] = seq
        flags[entry] = DIRTY_GFN_F_DIRTY  # published last, as KVM's store-release does


def test_every_entry_harvested_once_in_order() -> None:
    ring = np.zeros(N_ENTRIES, dtype=ringreader.DIRTY_GFN_DTYPE)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(ring, stop), daemon=True)
    out_slot = np.zeros(N_ENTRIES, np.uint32)
    out_offset = np.zeros(N_ENTRIES, np.uint64)
    got_slots: list[int] = []
    got_offsets: list[int] = []
    index = START
    deadline = time.monotonic() + 60
    producer.start()
    try:
        while len(got_offsets) < TOTAL and time.monotonic() < deadline:
            count, new_index = ringreader.harvest(ring, N_ENTRIES, index, out_slot, out_offset)
            assert new_index == (index + count) % 2**32
            got_slots += out_slot[:count].tolist()
            got_offsets += out_offset[:count].tolist()
            # Emulate KVM_RESET_DIRTY_RINGS: harvested (1Xb) entries go back to unused.
            harvested = (index + np.arange(count, dtype=np.uint64)) & MASK
            assert (ring["flags"][harvested] == DIRTY_GFN_F_RESET).all()
            ring["flags"][harvested] = 0
            index = new_index
            if count == 0:
                time.sleep(0)
    finally:
        stop.set()
        producer.join(10)
    assert got_offsets == list(range(TOTAL))
    assert got_slots == [seq % 7 for seq in range(TOTAL)]
    assert index == (START + TOTAL) % 2**32
