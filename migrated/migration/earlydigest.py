"""The target's digest of its RAM (verify = full), started as soon as every page is in.

The source digests its RAM after the pause and sends the digest in Done; the target used to
start its own digest only then, so the two ran one after the other inside the downtime (3.3 ms
each for the boot-sector guest here, measured by bench/timeline.py; in proportion to the data
for bigger guests). The target's RAM is final earlier: once every data stream ended and the device
state arrived (the final pages come before the state on the control connection), nothing but a
page batch writes it, and the protocol refuses a page batch after device state (R9,
transport/states.py). The source says in its description whether it will verify
(VmDescription.verify), so the target starts then, beside the source's digest, and at Done only
waits for what is left of it. Done's verify and digest still decide: an older source says
nothing ahead, and its target digests after Done as before.

The digest runs in a worker thread from the migration's nursery: a failure cancels it, and the
nursery waits for the thread to finish before the RAM it reads can be unmapped.
"""

from __future__ import annotations

import time

import trio

from ..kvm.memory import GuestMemory
from ..pagehash import memory_digest


class EarlyDigest:
    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._finished = trio.Event()
        self._sha256 = b""
        self.ms = 0.0
        """What the whole digest took (its worker thread's wall time)."""

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        started = time.perf_counter()
        self._sha256 = (await trio.to_thread.run_sync(memory_digest, self._memory)).sha256
        self.ms = (time.perf_counter() - started) * 1e3
        self._finished.set()

    async def sha256(self) -> bytes:
        """The digest, once the worker finished (a failed digest fails the nursery instead)."""
        await self._finished.wait()
        return self._sha256
