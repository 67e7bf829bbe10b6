"""The workload guest without KVM: build, ABI agreement, layout, long-mode tables, page checker."""

from __future__ import annotations

import ctypes
import math
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from migrated.guests import abi, build, layout, pages, workload
from migrated.guests.x86_64 import longmode
from migrated.guests.layout import plan_layout
from migrated.guests.pages import render_pages, verify_pages
from migrated.guests.workload import WorkloadGuest, WorkloadParams, install

SOURCES = Path(build.__file__).resolve().parent / "x86_64"
MIB = 1 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build.build_workload(tmp_path_factory.mktemp("guest"))


@pytest.fixture
def built_image(image: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Makes the loader use the image built by this test run, not an in-place one."""
    monkeypatch.setattr(workload, "IMAGE", workload.IMAGE.at(image.parent))
    return image


# ---- build -------------------------------------------------------------------------------


def test_image_builds_and_fits_its_region(image: Path) -> None:
    data = image.read_bytes()
    assert image.name == "workload-x86_64.bin"
    assert 0 < len(data) <= layout.CODE_MAX
    assert data[:4] == bytes.fromhex("4883e4f0")  # _start first: andq $-16, %rsp


def test_missing_gcc_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(build.GuestBuildError, match="gcc not found.*apt-get install gcc"):
        build.build_workload(tmp_path)


def test_missing_image_tells_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = workload.IMAGE.at(tmp_path)
    with pytest.raises(workload.GuestImageMissingError, match="make build"):
        missing.load()


def test_abi_header_and_python_agree() -> None:
    header = (SOURCES / "abi.h").read_text()
    in_c = {
        name: int(value, 0)
        for name, value in re.findall(r"^#define (WL_\w+) (0x[0-9a-fA-F]+|\d+)(?:ULL)?\b", header, re.M)
    }
    assert in_c == abi.constants()


def test_linker_script_matches_layout() -> None:
    script = (SOURCES / "workload.ld").read_text()
    assert int(re.search(r"CODE_BASE = (0x[0-9a-f]+);", script)[1], 16) == layout.CODE_GPA  # type: ignore[index]
    assert int(re.search(r"CODE_MAX = (0x[0-9a-f]+);", script)[1], 16) == layout.CODE_MAX  # type: ignore[index]


# ---- layout ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "vcpus", "ws", "message"),
    [
        (64 * MIB, 2, 64 * MIB, r"working set of 64 MiB does not fit: 64 MiB of RAM minus 4 MiB"),
        (64 * MIB, 0, 1 * MIB, r"0 vCPUs: the workload guest supports 1 to 64"),
        (64 * MIB, 65, 1 * MIB, r"65 vCPUs"),
        (64 * MIB, 1, 1000, r"working set 1000 bytes: must be a positive multiple of 4096"),
        (64 * MIB, 1, 0, r"working set 0 bytes"),
        (64 * MIB, 4, 3 * 4096, r"3 pages is smaller than 4 vCPUs"),
        (65 << 30, 1, 1 * MIB, r"maps at most 64 GiB"),
        (64 * MIB + 1, 1, 1 * MIB, r"memory .* multiple of 4096"),
    ],
)
def test_layout_rejects_what_does_not_fit(memory: int, vcpus: int, ws: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_layout(memory, vcpus, ws)


def test_layout_fills_memory_exactly() -> None:
    lay = plan_layout(64 * MIB, 2, 60 * MIB)
    assert lay.ws_base == 4 * MIB and lay.ws_end == 64 * MIB
    with pytest.raises(ValueError):
        plan_layout(64 * MIB, 2, 60 * MIB + 4096)


@pytest.mark.parametrize(("memory", "vcpus", "ws"), [(8 * MIB, 1, 4096), (4 << 30, 64, 3 << 30)])
def test_layout_regions_are_disjoint_and_aligned(memory: int, vcpus: int, ws: int) -> None:
    lay = plan_layout(memory, vcpus, ws)
    lm = lay.longmode
    regions = sorted(
        [
            (lm.pml4, 4096),
            (lm.pdpt, 4096),
            (lm.gdt, lm.gdt_limit + 1),
            (lm.idt, 4096),
            (lm.tss, vcpus * lm.tss_stride),
            (lm.pd, lm.pd_count * 4096),
            (lm.kernel_stacks, vcpus * lm.kernel_stack_size),
            (lay.code, lay.code_max),
            (lay.params, 4096),
            (lay.status, vcpus * 4096),
            (lay.stacks, vcpus * lay.stack_size),
            (lay.gen, lay.gen_bytes),
            (lay.ws_base, lay.ws_bytes),
        ]
    )
    for (a, size), (b, _) in zip(regions, regions[1:]):
        assert a + size <= b
    assert regions[0][0] > 0 and regions[-1][0] + regions[-1][1] <= memory
    supervisor = [lm.pml4, lm.pdpt, lm.gdt, lm.idt, lm.tss, lm.pd, lm.kernel_stacks]
    assert all(gpa + 4096 <= lm.user_base for gpa in supervisor)
    assert min(lay.code, lay.params, lay.status, lay.stacks, lay.gen) >= lm.user_base
    assert lay.ws_base % (2 * MIB) == 0 and lay.ws_base >= lay.metadata_end
    assert lay.gen_bytes >= 4 * lay.ws_pages
    shares = [lay.share(v) for v in range(vcpus)]
    assert shares[0][0] == 0 and sum(c for _, c in shares) == lay.ws_pages
    assert all(f1 + c1 == f2 for (f1, c1), (f2, _) in zip(shares, shares[1:]))


# ---- long mode ---------------------------------------------------------------------------


class FakeRam:
    """Guest RAM as a numpy array, written only through `write` (which records what it wrote)."""

    def __init__(self, size: int) -> None:
        self.ram = np.zeros(size, np.uint8)
        self.writes: list[tuple[int, int]] = []

    def write(self, gpa: int, data: bytes | npt.NDArray[np.generic]) -> None:
        raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data.view(np.uint8).ravel()
        assert 0 <= gpa and gpa + raw.size <= self.ram.size
        self.ram[gpa : gpa + raw.size] = raw
        self.writes.append((gpa, raw.size))

    def u64(self, gpa: int, words: int = 1) -> npt.NDArray[np.uint64]:
        return self.ram[gpa : gpa + 8 * words].view(np.uint64)


def test_page_tables_identity_map_with_user_bit_above_user_base() -> None:
    lay = plan_layout(3 << 30, 1, 4096)  # three page directories
    fake = FakeRam(4 * MIB)
    longmode.write_long_mode(fake.write, lay.longmode)
    lm = lay.longmode
    assert fake.u64(lm.pml4)[0] & ~np.uint64(0xFFF) == lm.pdpt
    pdpt = fake.u64(lm.pdpt, 4)
    assert [int(e) & ~0xFFF for e in pdpt[:3]] == [lm.pd, lm.pd + 4096, lm.pd + 8192] and pdpt[3] == 0
    pde = fake.u64(lm.pd, 3 * 512)
    assert np.array_equal(pde & ~np.uint64(0x1FFFFF), np.arange(3 * 512, dtype=np.uint64) << np.uint64(21))
    assert np.all(pde & np.uint64(0x81 | 0x2) == np.uint64(0x83))  # present, writable, 2 MiB
    user = (pde & np.uint64(4)) != 0
    assert not user[0] and user[1:].all()  # the first 2 MiB is supervisor-only


def test_gdt_and_tss_and_sregs_start_at_cpl3_in_64_bit_mode() -> None:
    lay = plan_layout(64 * MIB, 3, MIB)
    fake = FakeRam(8 * MIB)
    longmode.write_long_mode(fake.write, lay.longmode)
    lm = lay.longmode
    gdt = fake.u64(lm.gdt, 5 + 2 * 3)
    assert int(gdt[0]) == 0
    assert int(gdt[4]) >> 40 & 0xFF == 0xFB and int(gdt[4]) >> 53 & 1 == 1  # user code: DPL3, L
    assert int(gdt[3]) >> 40 & 0xFF == 0xF3  # user data: DPL3, writable
    for v in range(3):
        low, high = int(gdt[5 + 2 * v]), int(gdt[6 + 2 * v])
        base = (low >> 16 & 0xFFFFFF) | (low >> 56 & 0xFF) << 24 | high << 32
        assert base == lm.tss_gpa(v) and low >> 40 & 0xF == 0xB
        assert int(fake.u64(lm.tss_gpa(v) + 4)[0]) == lm.kernel_stack_top(v)
    s = longmode.user_sregs(lm, 2)
    assert (s.cs.selector, s.cs.dpl, s.cs.l, s.cs.db, s.cs.type, s.cs.s, s.cs.present) == (0x23, 3, 1, 0, 11, 1, 1)
    for seg in (s.ss, s.ds, s.es):
        assert (seg.selector, seg.dpl, seg.s, seg.present) == (0x1B, 3, 1, 1)
    assert (s.tr.selector, s.tr.base, s.tr.type, s.tr.s) == (0x28 + 32, lm.tss_gpa(2), 11, 0)
    assert (s.gdt.base, s.gdt.limit) == (lm.gdt, 0x28 + 3 * 16 - 1)
    assert s.cr0 == 0x80010033 and s.cr4 & 0x20 and s.efer == 0x500 and s.cr3 == lm.pml4


def test_install_writes_only_through_write_and_returns_registers(built_image: Path) -> None:
    lay = plan_layout(16 * MIB, 2, 8 * MIB)
    fake = FakeRam(16 * MIB)
    params = WorkloadParams(vcpus=2, working_set_bytes=8 * MIB, dirty_rate_mib_s=10, seed=7)
    states = install(fake.write, lay, params, tsc_khz=2_000_000)
    assert len(states) == 2
    for v, (regs, sregs) in enumerate(states):
        assert (regs.rip, regs.rsp, regs.rdi, regs.rsi, regs.rflags) == (
            lay.entry,
            lay.stack_top(v),
            v,
            lay.params,
            2,
        )
        assert sregs.cs.dpl == 3 and sregs.tr.base == lay.longmode.tss_gpa(v)
    written = np.zeros(fake.ram.size, bool)
    for gpa, size in fake.writes:
        written[gpa : gpa + size] = True
    assert not (fake.ram.astype(bool) & ~written).any()  # every non-zero byte came from write()
    assert fake.ram[lay.code : lay.code + built_image.stat().st_size].tobytes() == built_image.read_bytes()
    p = fake.u64(lay.params, 12)
    assert int(p[abi.WL_P_MAGIC]) == abi.WL_PARAMS_MAGIC
    assert int(p[abi.WL_P_TSC_HZ]) == 2_000_000_000 and int(p[abi.WL_P_SEED]) == 7
    assert int(p[abi.WL_P_RATE]) == 1280  # 10 MiB/s = 2560 pages/s, split over 2 vCPUs
    guest = WorkloadGuest(lay)
    guest.set_rate(fake.write, math.inf)
    assert int(p[abi.WL_P_RATE]) == abi.WL_RATE_UNLIMITED
    rates = fake.u64(lay.params + 8 * abi.WL_P_VCPU_RATE, 2)
    assert rates.tolist() == [0, 0]  # both vCPUs follow the VM-wide rate
    guest.set_vcpu_rate(fake.write, 1, 2.0)  # 2 MiB/s = 512 pages/s, vCPU 1 alone
    assert rates.tolist() == [0, 512] and int(p[abi.WL_P_RATE]) == abi.WL_RATE_UNLIMITED
    guest.set_vcpu_rate(fake.write, 1, 0.0)
    assert rates.tolist() == [0, 0]
    with pytest.raises(ValueError, match="vCPU 2: this guest has vCPUs 0 to 1"):
        guest.set_vcpu_rate(fake.write, 2, 1.0)
    assert guest.request_pass(fake.write, fake.ram) == 1 == int(p[abi.WL_P_PASS_REQ])
    assert guest.request_pass(fake.write, fake.ram) == 2
    assert [s.started for s in guest.status(fake.ram)] == [False, False]


def test_install_refuses_mismatched_params(built_image: Path) -> None:
    lay = plan_layout(16 * MIB, 2, 8 * MIB)
    with pytest.raises(ValueError, match="params for 1 vCPUs, layout for 2"):
        install(FakeRam(16 * MIB).write, lay, WorkloadParams(vcpus=1, working_set_bytes=8 * MIB), 1000)


@pytest.mark.parametrize(
    ("mib_s", "vcpus", "word"),
    [(0, 1, 0), (math.inf, 4, abi.WL_RATE_UNLIMITED), (1, 1, 256), (1, 2, 128), (0.0001, 4, 1)],
)
def test_rate_conversion(mib_s: float, vcpus: int, word: int) -> None:
    assert workload.rate_pages_per_vcpu(mib_s, vcpus) == word


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_rate_must_be_non_negative(bad: float) -> None:
    with pytest.raises(ValueError, match="dirty rate"):
        WorkloadParams(dirty_rate_mib_s=bad)


# ---- the page format: C and numpy agree; the checker catches damage -----------------------

SHIM = """
#include "page.h"
void fill(uint64_t *p, uint64_t gpa, uint64_t idx, uint32_t gen, uint32_t vcpu, uint64_t seed)
{ wl_fill_page(p, gpa, idx, gen, vcpu, seed); }
int valid(const uint64_t *p, uint64_t gpa, uint64_t idx, uint32_t gen, uint32_t vcpu)
{ return wl_page_valid(p, gpa, idx, gen, vcpu); }
"""


@pytest.fixture(scope="module")
def page_c(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The guest's page.h compiled for the host, to compare with the numpy reference."""
    tmp = tmp_path_factory.mktemp("pagec")
    (tmp / "shim.c").write_text(SHIM)
    lib = tmp / "libpage.so"
    subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", f"-I{SOURCES}", str(tmp / "shim.c"), "-o", str(lib)],
        check=True,
    )
    dll = ctypes.CDLL(str(lib))
    u64, u32, ptr = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p
    dll.fill.argtypes = [ptr, u64, u64, u32, u32, u64]
    dll.valid.argtypes = [ptr, u64, u64, u32, u32]
    return dll


@pytest.mark.parametrize(
    ("gpa", "index", "gen", "vcpu", "seed"),
    [(0x400000, 0, 1, 0, 0), (0x7FFFF000, 0x7FBFF, 0xFFFFFFFF, 63, 2**64 - 1), (0x1234000, 77, 12345, 3, 99)],
)
def test_c_and_numpy_write_identical_pages(
    page_c: ctypes.CDLL, gpa: int, index: int, gen: int, vcpu: int, seed: int
) -> None:
    c_page = np.full(512, 0xAA, np.uint64)
    page_c.fill(c_page.ctypes.data, gpa, index, gen, vcpu, seed)
    one = [np.array([x], np.uint64) for x in (gpa, index, gen, vcpu)]
    ref = render_pages(one[0], one[1], one[2], one[3], seed)[0]
    assert np.array_equal(c_page, ref)
    assert len(np.unique(ref[8:])) == 504  # a real pattern, not one repeated word
    assert page_c.valid(c_page.ctypes.data, gpa, index, gen, vcpu) == 1
    assert page_c.valid(c_page.ctypes.data, gpa, index, gen - 1 or 2, vcpu) == 0
    c_page.view(np.uint8)[4000] ^= 0x10
    assert page_c.valid(c_page.ctypes.data, gpa, index, gen, vcpu) == 0
    zero = np.zeros(512, np.uint64)
    assert page_c.valid(zero.ctypes.data, gpa, index, 0, vcpu) == 1


SEED = 0x5EED


@pytest.fixture
def guest_ram() -> Iterator[tuple[FakeRam, layout.WorkloadLayout]]:
    """RAM as the guest would leave it: 3 vCPUs, some pages written a few times, some never."""
    lay = plan_layout(8 * MIB, 3, 300 * 4096)
    fake = FakeRam(8 * MIB)
    params = np.zeros(512, np.uint64)
    params[abi.WL_P_SEED] = SEED
    fake.ram[lay.params : lay.params + 4096] = params.view(np.uint8)
    rng = np.random.default_rng(1)
    gens = rng.integers(1, 2**32, lay.ws_pages, dtype=np.uint64)
    gens[rng.random(lay.ws_pages) < 0.2] = 0
    idx = np.arange(lay.ws_pages, dtype=np.uint64)
    vcpus = np.repeat(np.arange(3, dtype=np.uint64), [lay.share(v)[1] for v in range(3)])
    rendered = render_pages(lay.ws_base + idx * np.uint64(4096), idx, gens, vcpus, SEED)
    rendered[gens == 0] = 0
    fake.ram[lay.ws_base : lay.ws_end] = rendered.view(np.uint8).ravel()
    fake.ram[lay.gen : lay.gen + 4 * lay.ws_pages] = gens.astype(np.uint32).view(np.uint8)
    yield fake, lay


def _gens(fake: FakeRam, lay: layout.WorkloadLayout) -> npt.NDArray[np.uint32]:
    return fake.ram[lay.gen : lay.gen + 4 * lay.ws_pages].view(np.uint32)


def _written_pages(fake: FakeRam, lay: layout.WorkloadLayout) -> npt.NDArray[np.intp]:
    return np.flatnonzero(_gens(fake, lay))


def test_checker_accepts_reference_pages(guest_ram: tuple[FakeRam, layout.WorkloadLayout]) -> None:
    fake, lay = guest_ram
    report = verify_pages(fake.ram, lay)
    assert report.ok and report.pages_checked == 300 and 200 < report.pages_written < 300
    assert report.first_bad == ()


def test_checker_rejects_flipped_body_byte(guest_ram: tuple[FakeRam, layout.WorkloadLayout]) -> None:
    fake, lay = guest_ram
    page = int(_written_pages(fake, lay)[5])
    fake.ram[lay.ws_base + page * 4096 + 1000] ^= 1
    report = verify_pages(fake.ram, lay)
    assert (report.bad_pages, report.bad_checksum, report.bad_header) == (1, 1, 0)
    assert report.first_bad == (lay.ws_base + page * 4096,)


@pytest.mark.parametrize("word", [abi.WL_H_MAGIC, abi.WL_H_GPA, abi.WL_H_GEN, abi.WL_H_INDEX, 6])
def test_checker_rejects_wrong_header(guest_ram: tuple[FakeRam, layout.WorkloadLayout], word: int) -> None:
    fake, lay = guest_ram
    page = int(_written_pages(fake, lay)[-1])
    fake.ram[lay.ws_base + page * 4096 + 8 * word + 2] ^= 0x40
    report = verify_pages(fake.ram, lay)
    assert (report.bad_pages, report.bad_header) == (1, 1)


def test_checker_rejects_wrong_generation(guest_ram: tuple[FakeRam, layout.WorkloadLayout]) -> None:
    fake, lay = guest_ram
    pages_ = _written_pages(fake, lay)[:3]
    _gens(fake, lay)[pages_] += 1  # the array moved on, the pages did not (a lost page)
    report = verify_pages(fake.ram, lay)
    assert (report.bad_pages, report.bad_header) == (3, 3)


def test_checker_rejects_a_self_consistent_page_of_another_generation(
    guest_ram: tuple[FakeRam, layout.WorkloadLayout],
) -> None:
    """An old copy of the page whose header was patched up: only the pattern check sees it."""
    fake, lay = guest_ram
    page = int(_written_pages(fake, lay)[0])
    gpa = lay.ws_base + page * 4096
    words = fake.u64(gpa, 512)
    old = pages.bodies(np.array([gpa], np.uint64), np.array([int(words[2]) & 0xFFFFFFFF ^ 1], np.uint64), SEED)
    words[8:] = old[0]
    words[abi.WL_H_CHECKSUM] = pages.checksums(old)[0]
    assert verify_pages(fake.ram, lay, pattern=False).ok
    report = verify_pages(fake.ram, lay)
    assert (report.bad_pages, report.bad_pattern, report.bad_checksum) == (1, 1, 0)


def test_checker_rejects_dirt_in_a_never_written_page(
    guest_ram: tuple[FakeRam, layout.WorkloadLayout],
) -> None:
    fake, lay = guest_ram
    page = int(np.flatnonzero(_gens(fake, lay) == 0)[0])
    fake.ram[lay.ws_base + page * 4096 + 4095] = 1
    report = verify_pages(fake.ram, lay)
    assert (report.bad_pages, report.bad_unwritten) == (1, 1)


def test_checker_skips_the_page_a_vcpu_was_writing(
    guest_ram: tuple[FakeRam, layout.WorkloadLayout],
) -> None:
    fake, lay = guest_ram
    first, _ = lay.share(1)
    fake.ram[lay.ws_base + first * 4096 + 2000] ^= 0xFF  # torn by a stop mid-write
    fake.u64(lay.status_gpa(1) + 8 * abi.WL_S_BUSY_PAGE)[0] = first + 1
    report = verify_pages(fake.ram, lay)
    assert report.ok and report.in_flight == 1
