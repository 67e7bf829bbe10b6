"""The arm64 lane itself: the emulated machine offers what the arm64 tests rely on.

Runs only in the lane (`make test-arm64`): Debian's arm64 kernel under qemu-system-aarch64 with
EL2, so /dev/kvm is a real arm64 KVM; Debian's arm64 Python, numpy and cffi backend; the
repository's cffi extensions cross-built for aarch64; pure and aarch64 wheels for the rest.
"""

from __future__ import annotations

import errno
import os
import platform
import stat
from collections.abc import Callable

import numpy as np
import pytest

from migrated.kvm import uapi
from migrated.kvm.memory import GuestMemory
from migrated.kvm.system import HostCaps, Kvm

pytestmark = pytest.mark.arm64

RING_BYTES = 64 << 10
MIB = 1 << 20


def test_machine_is_aarch64_with_a_kvm_device() -> None:
    assert platform.machine() == "aarch64"
    mode = os.stat("/dev/kvm").st_mode
    assert stat.S_ISCHR(mode), "/dev/kvm is not a character device"


def test_caps_report_an_arm64_kvm_with_ring_and_backup_bitmap(host_caps: HostCaps) -> None:
    assert host_caps.arch == "aarch64"
    assert host_caps.api_version == uapi.KVM_API_VERSION
    assert not host_caps.pvm
    assert host_caps.dirty_ring_acq_rel is True
    assert host_caps.dirty_ring_with_bitmap is True
    assert host_caps.dirty_ring_max_bytes == MIB  # 65,536 entries of 16 bytes
    assert host_caps.vcpu_mmap_bytes > 0


def test_only_the_acq_rel_ring_is_offered(kvm: Kvm) -> None:
    # HOST-NOTES: on arm64 plain KVM_CAP_DIRTY_LOG_RING is 0; Vm picks ACQ_REL when offered.
    assert kvm.check_extension(uapi.KVM_CAP_DIRTY_LOG_RING) == 0
    assert kvm.check_extension(uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) == MIB


def test_with_bitmap_after_the_ring_on_a_fresh_vm(vm_fd: int, enable_cap: Callable[..., int]) -> None:
    assert enable_cap(vm_fd, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, RING_BYTES) == 0
    assert enable_cap(vm_fd, uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) == 0


def test_with_bitmap_needs_the_ring_first(vm_fd: int, enable_cap: Callable[..., int]) -> None:
    with pytest.raises(OSError) as info:
        enable_cap(vm_fd, uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    assert info.value.errno == errno.EINVAL


def test_with_bitmap_after_a_memslot_is_einval_until_the_slots_are_gone(
    vm_fd: int,
    enable_cap: Callable[..., int],
    set_memslot: Callable[..., int],
    guest_memory: Callable[[int], GuestMemory],
) -> None:
    # HOST-NOTES "Ordering checks": the kernel allows WITH_BITMAP only while all memslots are
    # empty, which is why Vm enables it before adding memory (DESIGN R2).
    memory = guest_memory(2 * MIB)
    address = memory.host_address(memory.regions[0])
    assert enable_cap(vm_fd, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, RING_BYTES) == 0
    set_memslot(vm_fd, 0, 0, 2 * MIB, address)
    with pytest.raises(OSError) as info:
        enable_cap(vm_fd, uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    assert info.value.errno == errno.EINVAL
    set_memslot(vm_fd, 0, 0, 0, address)  # size 0 deletes the slot
    assert enable_cap(vm_fd, uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) == 0


def test_cross_built_extensions_are_aarch64_builds() -> None:
    import migrated.pagehash._pagehash as pagehash_ext
    import ringreader
    import ringreader._ringreader as ringreader_ext

    for module in (ringreader_ext, pagehash_ext):
        assert module.__file__ is not None
        assert module.__file__.endswith(".cpython-311-aarch64-linux-gnu.so"), module.__file__
        with open(module.__file__, "rb") as f:
            header = f.read(20)
        assert header[:4] == b"\x7fELF"
        assert int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    assert ringreader.ABI_VERSION == ringreader_ext.lib.rr_abi_version()


def _random_ring(rng: np.random.Generator, n: int) -> np.ndarray:
    import ringreader

    ring = np.zeros(n, dtype=ringreader.DIRTY_GFN_DTYPE)
    ring["slot"] = rng.integers(0, 4, n, dtype=np.uint32)
    ring["offset"] = rng.integers(0, 512, n, dtype=np.uint64)
    # Mostly dirty, some clean / RESET / both bits, so harvests stop at various places.
    ring["flags"] = rng.choice(np.array([0, 1, 2, 3], np.uint32), size=n, p=[0.05, 0.85, 0.05, 0.05])
    return ring


@pytest.mark.parametrize("seed", range(8))
def test_ring_harvest_and_dedup_match_the_oracle(seed: int) -> None:
    import ringreader
    from ringreader import oracle

    rng = np.random.default_rng(seed)
    n = 1 << int(rng.integers(3, 11))
    ring = _random_ring(rng, n)
    twin = ring.copy()
    # Start near the u32 wraparound of the free-running index half the time.
    index = int(rng.integers(0, n)) if seed % 2 else 2**32 - int(rng.integers(1, n + 1))
    out_slot = np.zeros(n, np.uint32)
    out_offset = np.zeros(n, np.uint64)
    dedup = ringreader.DirtyDedup([512] * 4)
    for _ in range(4):
        capacity = int(rng.integers(1, n + 1))
        count, new_index = ringreader.harvest(ring, n, index, out_slot, out_offset, capacity)
        slots, offsets, oracle_index = oracle.harvest(twin, n, index, capacity)
        assert (out_slot[:count].tolist(), out_offset[:count].tolist()) == (slots, offsets)
        assert new_index == oracle_index
        assert ring.tobytes() == twin.tobytes()
        kept_slot, kept_offset = dedup.unique(out_slot[:count], out_offset[:count])
        assert (kept_slot.tolist(), kept_offset.tolist()) == oracle.dedup(slots, offsets, [512] * 4)
        index = new_index
        # The kernel would refill: dirty some entries again, in both copies.
        again = rng.random(n) < 0.5
        ring["flags"][again] = ringreader.DIRTY_GFN_F_DIRTY
        twin["flags"][again] = ringreader.DIRTY_GFN_F_DIRTY
    assert dedup.bitmaps_are_clear()

    bitmap = rng.integers(0, 2**63, 16, dtype=np.uint64) & rng.integers(0, 2**63, 16, dtype=np.uint64)
    assert ringreader.bitmap_to_pages(bitmap).tolist() == oracle.bitmap_to_pages(bitmap.tolist())


def test_page_digest_equals_the_x86_64_build() -> None:
    """The digest must not depend on the CPU it is computed on.

    Values computed with the x86_64 build (ABI 1; ABI 2 added `nonzero_pages` and left the hash
    as it was, checked again on x86_64) by:
        i = np.arange(8 * 4096, dtype=np.uint64); ram = ((i * 2654435761) >> 11).astype(np.uint8)
        ram[2 * 4096 : 3 * 4096] = 0; page_hashes(ram, 0x12345); ram_digest([(0x12345 * 4096, ram)])
    Recompute them there if the hash changes (and bump pagehash's ABI_VERSION).
    """
    from migrated.pagehash import ABI_VERSION, PAGE_SIZE, page_hashes, ram_digest, zero_page_hashes

    assert ABI_VERSION == 2
    i = np.arange(8 * PAGE_SIZE, dtype=np.uint64)
    ram = ((i * 2654435761) >> 11).astype(np.uint8)
    ram[2 * PAGE_SIZE : 3 * PAGE_SIZE] = 0
    hashes = page_hashes(ram, first_pfn=0x12345)
    assert [int(h) for h in hashes[:3]] == [0xEE1C63317F807D3C, 0x2D209F90AAEE54D9, 0x8D8DE47AE32FF2D]
    assert hashes[2] == zero_page_hashes(1, 0x12345 + 2)[0]
    digest = ram_digest([(0x12345 * PAGE_SIZE, ram)])
    assert digest.hex() == "4b6744ef70a17e131a5be66089999e443c39e19721f135c35dd9290186e1d0d7"
    assert digest.pages == 8


def test_zero_page_split_equals_numpy() -> None:
    """The C zero-page check (the bulk copy's split) against numpy on this CPU: a non-zero byte
    at every offset class of a page (first word, later words, last byte) and all-zero pages."""
    from migrated.pagehash import PAGE_SIZE, nonzero_pages

    ram = np.zeros(64 * PAGE_SIZE, np.uint8)
    for page, offset in enumerate((0, 1, 7, 8, 63, 64, 2047, 2048, 4095)):
        ram[page * 2 * PAGE_SIZE + offset] = 1  # every other page stays zero
    expected = ram.reshape(-1, PAGE_SIZE).any(axis=1)
    assert nonzero_pages(ram).tolist() == expected.tolist()
    assert int(expected.sum()) == 9


def test_third_party_packages_import() -> None:
    import msgpack
    import structlog
    import trio

    assert trio.__version__
    assert structlog.get_logger() is not None
    value = {"vm": "lane", "pages": [1, 2**40], "raw": b"\x00\xff"}
    assert msgpack.unpackb(msgpack.packb(value)) == value


def test_two_trio_tasks_talk_over_loopback_tcp() -> None:
    import msgpack
    import trio

    received: list[object] = []

    async def main() -> None:
        with trio.fail_after(60):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]

            async def serve(stream: trio.SocketStream) -> None:
                unpacker = msgpack.Unpacker()
                async with stream:
                    while len(received) < 3:
                        data = await stream.receive_some(65536)
                        assert data, "client closed early"
                        unpacker.feed(data)
                        received.extend(unpacker)
                    await stream.send_all(msgpack.packb("done"))

            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, serve, listeners)
                client = await trio.open_tcp_stream("127.0.0.1", port)
                async with client:
                    for message in ({"seq": 1}, b"x" * 200_000, [3, "three"]):
                        await client.send_all(msgpack.packb(message))
                    reply = await client.receive_some(64)
                    assert msgpack.unpackb(reply) == "done"
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert received == [{"seq": 1}, b"x" * 200_000, [3, "three"]]
