"""What a daemon's first migration would otherwise pay on its way, paid at start-up, before READY.

Measured on this project's hosts (issue 12): the first migration of a daemon pair spent 10-20 ms
more in its setup than the later ones, on first calls, all while holding the GIL:

- numpy 2.x imports `numpy.ma` the first time `np.unique` runs (it asks `np.ma.is_masked`):
  9-30 ms inside the source's first re-arm (`GuestMemory.take_daemon_dirty`), beside the
  handshake; `numpy.ctypeslib` on the first `GuestMemory` (the target's first VM);
- the first psk handshake and the first sealed frame (HMAC, HKDF, AES-GCM, msgpack): 1.5 ms,
  against 0.35 ms for the next ones;
- the first look at this host's CPU for a VM's description (`vmstate.cpu_features`): 0.7 ms;
- the data streams' record buffers (recordbuffers.py), made on the first records that found
  none large enough: the faults of a few MiB, 1-1.5 ms per MiB on a loaded host, inside the
  copy on both sides (the target's last record was received and applied 3-4 ms later than it
  could have been: the tail the source waits for as `streams_drained`). Made here at their
  largest (`migration.max_batch_bytes`), as many as the pool keeps: ~32 MiB that a daemon kept
  after its first migrations anyway;
- the data streams' threads, started with every migration on both sides: each start waits for
  the new thread to be scheduled, 2.8 ms after ACCEPT on a warm link's setup under load. Four are
  started here and parked (migration/parkedthreads.py).

None of this depends on a VM or a peer, so a dry run of the same calls in memory (no socket, no
VM, a throwaway key) costs a few milliseconds once, at start-up. The rest of a first migration's
extra cost (trio's worker threads, which it starts on first use and ends after 10 s idle, and
a VM build's first ioctls, under 1 ms) is not worth a resource kept for it.
"""

from __future__ import annotations

import importlib
import os
import time

from transport import Accept, Connection, Event, MemoryRegion, Role, VmDescription

from .kvm.system import Kvm
from .migration import vmstate
from .migration.parkedthreads import STREAM_THREADS
from .migration.recordbuffers import RECORD_BUFFERS, largest_record_bytes

# Modules numpy imports on the first call of a function the migration paths use; each named
# with the call that imports it.
LAZY_MODULES = (
    "numpy.ma",  # np.unique, np.union1d (numpy 2.x: `np.ma.is_masked`)
    "numpy.ctypeslib",  # np.ctypeslib.as_array (GuestMemory)
)


def warm_up(kvm: Kvm, max_batch_bytes: int) -> dict[str, float]:
    """Import what migrations would import late, run one handshake in memory, make the record
    buffers; returns each step's milliseconds (logged as `daemon_warmed`)."""
    steps: dict[str, float] = {}
    started = time.perf_counter()
    for name in LAZY_MODULES:
        importlib.import_module(name)
    steps["imports_ms"] = _ms_since(started)
    started = time.perf_counter()
    features = vmstate.cpu_features(kvm)
    steps["cpu_features_ms"] = _ms_since(started)
    started = time.perf_counter()
    _handshake_in_memory(features, kvm.caps().arch)
    steps["handshake_ms"] = _ms_since(started)
    started = time.perf_counter()
    RECORD_BUFFERS.prefill(largest_record_bytes(max_batch_bytes))
    steps["record_buffers_ms"] = _ms_since(started)
    started = time.perf_counter()
    STREAM_THREADS.fill()
    steps["stream_threads_ms"] = _ms_since(started)
    return steps


def _handshake_in_memory(features: dict[str, object], arch: str) -> None:
    """Both sides of a psk setup, wired back to back: Hello, Auth, a sealed description and a
    sealed Accept, each checked on the other side. The key is thrown away with them."""
    key = os.urandom(32)
    source = Connection(Role.SOURCE, node="warm-up", psk=key)
    target = Connection(Role.TARGET, node="warm-up", psk=key)
    description = VmDescription(
        name="warm-up",
        migration_id="warm-up",
        memory=(MemoryRegion(0, 0, 1 << 21),),
        vcpus=1,
        guest_kind="none",
        cpu_features={"spec": {}, **features},
        dirty_tracking="ring",
        arch=arch,
    )
    _deliver(source, target, source.make_hello())
    _deliver(target, source, target.make_hello())
    _deliver(source, target, source.make_auth())
    _deliver(target, source, target.make_auth())
    _deliver(source, target, description)
    _deliver(target, source, Accept())


def _deliver(sender: Connection, receiver: Connection, event: Event) -> None:
    receiver.receive_data(b"".join(sender.send_buffers(event)))
    received = receiver.next_event()
    if type(received) is not type(event):
        raise RuntimeError(f"warm-up handshake: sent {type(event).__name__}, received {received!r}")


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1e3, 3)
