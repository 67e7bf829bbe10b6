"""The arm64 workload guest without KVM: cross-build, link address, identity map, ABI agreement,
layout, loader, status view, page checker; and one boot under QEMU's own (TCG) GICv3 and ITS.

Building needs Debian's gcc-aarch64-linux-gnu (a build requirement of the package, like gcc for
the x86 guest). The TCG boot runs where qemu-system-aarch64 is installed (Debian
qemu-system-arm, which the arm64 lane needs anyway) and says so where it is not.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from migrated.guests.aarch64 import boot as ab
from migrated.guests import abi, build
from migrated.guests.aarch64.boot import (
    Arm64Layout,
    Arm64WorkloadGuest,
    ItsSettings,
    install,
    plan_layout_aarch64,
)
from migrated.guests.pages import render_pages
from migrated.guests.workload import GuestPhase, WorkloadParams
from migrated.kvm.arch import aarch64 as arm

SOURCES = build.AARCH64_SOURCE_DIR
MIB = 1 << 20
NM = "aarch64-linux-gnu-nm"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("guest-aarch64")
    elf = out / "workload-aarch64.elf"
    return build.build_workload_aarch64(out, elf_copy=elf), elf


@pytest.fixture
def built_image(built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Makes the loader use the image built by this test run, not an in-place one."""
    monkeypatch.setattr(ab, "IMAGE", ab.IMAGE.at(built[0].parent))
    return built[0]


def symbols(elf: Path) -> dict[str, int]:
    out = subprocess.run([NM, str(elf)], capture_output=True, text=True, check=True).stdout
    return {m[3]: int(m[1], 16) for m in re.finditer(r"^([0-9a-f]+) (\w) (\S+)$", out, re.M)}


# ---- build -------------------------------------------------------------------------------


def test_image_builds_and_fits_its_region(built: tuple[Path, Path]) -> None:
    image, elf = built
    assert image.name == ab.IMAGE.name
    assert 0 < image.stat().st_size <= ab.CODE_MAX
    header = elf.read_bytes()[:64]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # ELF64
    (machine,) = struct.unpack_from("<H", header, 18)
    assert machine == 183  # EM_AARCH64


def test_image_is_linked_at_its_guest_physical_address(built: tuple[Path, Path]) -> None:
    image, elf = built
    (entry,) = struct.unpack_from("<Q", elf.read_bytes(), 24)
    sym = symbols(elf)
    assert entry == sym["_start"] == ab.CODE_GPA == ab.RAM_BASE
    assert sym["_image_end"] - ab.CODE_GPA == image.stat().st_size
    assert sym["l1_table"] % 4096 == 0 and sym["vectors"] % 2048 == 0
    assert ab.CODE_GPA <= sym["workload_main"] < sym["_image_end"]
    magic_at = sym["wla_params_magic"] - ab.CODE_GPA
    assert image.read_bytes()[magic_at : magic_at + 8] == abi.WL_PARAMS_MAGIC.to_bytes(8, "little")


def test_image_carries_the_identity_map(built: tuple[Path, Path]) -> None:
    image, elf = built
    at = symbols(elf)["l1_table"] - ab.CODE_GPA
    table = np.frombuffer(image.read_bytes()[at : at + 4096], np.uint64)
    gib = 1 << 30

    def out(e: int) -> int:
        return e & ((1 << 48) - 1) & ~(gib - 1)

    device, normal = int(table[0]), [int(e) for e in table[1:]]
    assert device & 3 == 1 and out(device) == 0  # a block at 0: the GIC lives below 1 GiB
    assert (device >> 2) & 7 == 0 and device >> 53 & 3 == 3  # Device attribute, never executed
    assert all(g < gib for g in (ab.GICD_BASE, ab.GICR_BASE, ab.ITS_BASE))
    for i, e in enumerate(normal, start=1):
        assert e & 3 == 1 and out(e) == i * gib and (e >> 2) & 7 == 1  # Normal write-back
        assert e >> 10 & 1 and (e >> 8) & 3 == 3 and not e >> 53 & 1  # AF, inner shareable, EL1 x
    assert ab.RAM_BASE == gib and ab.RAM_BASE + ab.MAX_MEMORY == 512 * gib


def test_missing_cross_compiler_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    expected = r"aarch64-linux-gnu-gcc not found.*apt-get install gcc-aarch64-linux-gnu"
    with pytest.raises(build.GuestBuildError, match=expected):
        build.build_workload_aarch64(tmp_path)


def test_python_m_build_builds_both_images(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made: list[tuple[str, Path]] = []

    def fake(name: str) -> object:
        def make(out_dir: Path) -> Path:
            made.append((name, out_dir))
            (tmp_path / name).write_bytes(b"x")
            return tmp_path / name

        return make

    monkeypatch.setattr(build, "build_workload", fake("x86_64"))
    monkeypatch.setattr(build, "build_workload_aarch64", fake("aarch64"))
    assert build.main() == 0
    package = Path(build.__file__).resolve().parent
    assert made == [("x86_64", package), ("aarch64", package)]
    assert capsys.readouterr().out.count("built ") == 2


# ---- the contract ------------------------------------------------------------------------


def test_abi_header_and_python_agree() -> None:
    header = (SOURCES / "abi_aarch64.h").read_text()
    in_c = {
        name: int(value, 0) for name, value in re.findall(r"^#define (WLA_\w+) (0x[0-9a-fA-F]+|\d+)\b", header, re.M)
    }
    assert in_c == ab.constants()


def test_one_copy_of_the_shared_contract() -> None:
    """The arm64 guest compiles x86_64/abi.h, page.h and the loop in workload_core.h in (one copy
    of each: abi.py's test covers the first two, the x86 guest's tests the loop)."""
    for shared in ("abi.h", "page.h", "workload_core.h"):
        assert not (SOURCES / shared).exists(), shared
    assert '"workload_core.h"' in (SOURCES / "workload.c").read_text()
    core = (SOURCES.parent / "x86_64" / "workload_core.h").read_text()
    assert '"abi.h"' in core and '"page.h"' in core


def test_arm64_words_follow_the_shared_ones() -> None:
    shared = abi.constants()
    for prefix in ("P", "S"):
        generic = [v for k, v in shared.items() if k.startswith(f"WL_{prefix}_")]
        mine = [v for k, v in ab.constants().items() if k.startswith(f"WLA_{prefix}_")]
        assert max(generic) < ab.WLA_FIRST_WORD <= min(mine)
        assert len(set(mine)) == len(mine) and max(mine) < 64  # the view reads 64 status words
    states = {v for k, v in shared.items() if k.startswith("WL_STATE_")}
    assert ab.WLA_STATE_FAULT not in states
    assert ab.WLA_INT_EVENTS < ab.WLA_EVENTS == 1 << ab.WLA_EVENT_BITS
    assert ab.WLA_LPI_BASE + ab.WLA_EVENTS <= 1 << ab.WLA_LPI_ID_BITS


def test_linker_script_matches_layout() -> None:
    script = (SOURCES / "workload.ld").read_text()
    assert int(re.search(r"CODE_BASE = (0x[0-9a-f]+);", script)[1], 16) == ab.CODE_GPA  # type: ignore[index]
    assert int(re.search(r"CODE_MAX = (0x[0-9a-f]+);", script)[1], 16) == ab.CODE_MAX  # type: ignore[index]


def test_gic_and_ram_are_where_the_vm_layer_puts_them() -> None:
    assert (ab.RAM_BASE, ab.GICD_BASE, ab.GICR_BASE, ab.ITS_BASE) == (
        arm.RAM_BASE,
        arm.GICD_BASE,
        arm.GICR_BASE,
        arm.ITS_BASE,
    )


# ---- layout ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "vcpus", "ws", "message"),
    [
        (64 * MIB, 2, 62 * MIB, r"working set of 62 MiB does not fit: 64 MiB of RAM minus 4 MiB"),
        (64 * MIB, 0, 1 * MIB, r"0 vCPUs: the workload guest supports 1 to 64"),
        (64 * MIB, 65, 1 * MIB, r"65 vCPUs"),
        (64 * MIB, 1, 1000, r"working set 1000 bytes: must be a positive multiple of 4096"),
        (64 * MIB, 4, 3 * 4096, r"3 pages is smaller than 4 vCPUs"),
        (512 << 30, 1, 1 * MIB, r"maps RAM up to 512 GiB"),
        (64 * MIB + 1, 1, 1 * MIB, r"memory .* multiple of 4096"),
    ],
)
def test_layout_rejects_what_does_not_fit(memory: int, vcpus: int, ws: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_layout_aarch64(memory, vcpus, ws)


def test_layout_fills_memory_exactly() -> None:
    lay = plan_layout_aarch64(64 * MIB, 2, 60 * MIB)
    assert lay.ws_base == ab.RAM_BASE + 4 * MIB and lay.ws_end == lay.ram_end
    with pytest.raises(ValueError):
        plan_layout_aarch64(64 * MIB, 2, 60 * MIB + 4096)


@pytest.mark.parametrize(("memory", "vcpus", "ws"), [(8 * MIB, 1, 4096), (4 << 30, 64, 3 << 30)])
def test_layout_regions_are_disjoint_and_aligned(memory: int, vcpus: int, ws: int) -> None:
    lay = plan_layout_aarch64(memory, vcpus, ws)
    regions = sorted(
        [
            (lay.code, lay.code_max),
            (lay.params, 4096),
            (lay.status, ab.MAX_VCPUS * 4096),
            (lay.stacks, ab.MAX_VCPUS * lay.stack_size),
            (lay.its_device_table, ab.ITS_TABLE_BYTES),
            (lay.its_collection_table, ab.ITS_TABLE_BYTES),
            (lay.its_cmdq, ab.ITS_CMDQ_BYTES),
            (lay.its_itt, ab.ITS_ITT_BYTES),
            (lay.lpi_prop, ab.LPI_PROP_BYTES),
            (lay.lpi_pend, 0x10000),
            (lay.gen, lay.gen_bytes),
            (lay.ws_base, lay.ws_bytes),
        ]
    )
    for (a, size), (b, _) in zip(regions, regions[1:]):
        assert a + size <= b
    assert regions[0][0] == ab.RAM_BASE and regions[-1][0] + regions[-1][1] <= lay.ram_end
    # KVM: GITS_BASER tables in 64 KiB pages, GITS_CBASER 64 KiB aligned, PENDBASER 64 KiB.
    for gpa in (lay.its_device_table, lay.its_collection_table, lay.its_cmdq, lay.lpi_pend):
        assert gpa % 0x10000 == 0
    assert lay.its_itt % 256 == 0 and lay.lpi_prop % 4096 == 0
    assert ab.LPI_PROP_BYTES == 8192 and ab.LPI_PEND_BYTES == 2048
    assert lay.ws_base % (2 * MIB) == 0 and lay.ws_base >= lay.metadata_end
    shares = [lay.share(v) for v in range(vcpus)]
    assert shares[0][0] == 0 and sum(c for _, c in shares) == lay.ws_pages
    assert set(lay.kvm_written_tables()) == {
        "its device table",
        "its collection table",
        "itt",
        "lpi pending table",
    }


# ---- loader ------------------------------------------------------------------------------


class FakeRam:
    """Guest RAM from RAM_BASE as a numpy array (what `Vm.ram` is), written only through `write`."""

    def __init__(self, size: int) -> None:
        self.ram = np.zeros(size, np.uint8)
        self.writes: list[tuple[int, int]] = []

    def write(self, gpa: int, data: bytes | npt.NDArray[np.generic]) -> None:
        raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data.view(np.uint8).ravel()
        at = gpa - ab.RAM_BASE
        assert 0 <= at and at + raw.size <= self.ram.size
        self.ram[at : at + raw.size] = raw
        self.writes.append((gpa, raw.size))

    def u64(self, gpa: int, words: int = 1) -> npt.NDArray[np.uint64]:
        at = gpa - ab.RAM_BASE
        return self.ram[at : at + 8 * words].view(np.uint64)


def test_install_writes_only_through_write_and_returns_entries(built_image: Path) -> None:
    lay = plan_layout_aarch64(16 * MIB, 2, 8 * MIB)
    fake = FakeRam(16 * MIB)
    params = WorkloadParams(vcpus=2, working_set_bytes=8 * MIB, dirty_rate_mib_s=10, seed=7)
    entries = install(fake.write, lay, params, ItsSettings(device_id=5, lpi_rate_hz=250))
    assert [(e.pc, e.x0, e.x1, e.pstate) for e in entries] == [(ab.CODE_GPA, v, lay.params, 0x3C5) for v in range(2)]
    written = np.zeros(fake.ram.size, bool)
    for gpa, size in fake.writes:
        written[gpa - ab.RAM_BASE : gpa - ab.RAM_BASE + size] = True
    assert not (fake.ram.astype(bool) & ~written).any()  # every non-zero byte came from write()
    code = lay.code - ab.RAM_BASE
    assert fake.ram[code : code + built_image.stat().st_size].tobytes() == built_image.read_bytes()
    p = fake.u64(lay.params, 64)
    assert int(p[abi.WL_P_MAGIC]) == abi.WL_PARAMS_MAGIC
    assert int(p[abi.WL_P_TSC_HZ]) == 0  # the guest reads CNTFRQ_EL0
    assert int(p[abi.WL_P_RATE]) == 1280 and int(p[abi.WL_P_SEED]) == 7
    assert int(p[abi.WL_P_WS_BASE]) == lay.ws_base and int(p[abi.WL_P_GEN_BASE]) == lay.gen
    assert int(p[ab.WLA_P_VERSION]) == ab.WLA_VERSION and int(p[ab.WLA_P_FEATURES]) == ab.WLA_F_ITS
    assert [int(p[w]) for w in (ab.WLA_P_GICD_BASE, ab.WLA_P_GICR_BASE, ab.WLA_P_ITS_BASE)] == [
        arm.GICD_BASE,
        arm.GICR_BASE,
        arm.ITS_BASE,
    ]
    assert int(p[ab.WLA_P_ITS_DEVICE_TABLE]) == lay.its_device_table
    assert int(p[ab.WLA_P_ITS_COLL_TABLE]) == lay.its_collection_table
    assert int(p[ab.WLA_P_ITS_CMDQ]) == lay.its_cmdq and int(p[ab.WLA_P_ITS_ITT]) == lay.its_itt
    assert int(p[ab.WLA_P_LPI_PROP]) == lay.lpi_prop and int(p[ab.WLA_P_LPI_PEND]) == lay.lpi_pend
    assert int(p[ab.WLA_P_ITS_DEVICE_ID]) == 5 and int(p[ab.WLA_P_LPI_RATE]) == 250
    assert (int(p[ab.WLA_P_STACK_BASE]), int(p[ab.WLA_P_STACK_SIZE])) == (lay.stacks, 16 << 10)

    guest = Arm64WorkloadGuest(lay)
    guest.set_rate(fake.write, math.inf)
    guest.set_lpi_rate(fake.write, 0)
    guest.hold_lpis(fake.write, True)
    guest.set_mode(fake.write, "passes")
    assert int(p[abi.WL_P_RATE]) == abi.WL_RATE_UNLIMITED and int(p[ab.WLA_P_LPI_RATE]) == 0
    assert int(p[ab.WLA_P_LPI_HOLD]) == 1 and int(p[abi.WL_P_MODE]) == abi.WL_MODE_PASSES
    assert guest.request_pass(fake.write, fake.ram) == 1 == int(p[abi.WL_P_PASS_REQ])
    assert guest.its_device_id(fake.ram) == 5
    assert [s.started for s in guest.status(fake.ram)] == [False, False]


def test_install_without_its_and_refusals(built_image: Path) -> None:
    lay = plan_layout_aarch64(16 * MIB, 2, 8 * MIB)
    fake = FakeRam(16 * MIB)
    params = WorkloadParams(vcpus=2, working_set_bytes=8 * MIB)
    install(fake.write, lay, params, ItsSettings(enabled=False))
    assert int(fake.u64(lay.params + 8 * ab.WLA_P_FEATURES)[0]) == 0
    with pytest.raises(ValueError, match="params for 1 vCPUs, layout for 2"):
        install(fake.write, lay, WorkloadParams(vcpus=1, working_set_bytes=8 * MIB))
    with pytest.raises(ValueError, match="device table holds ids below 8192"):
        ItsSettings(device_id=9000)
    with pytest.raises(ValueError, match="LPI rate"):
        ItsSettings(lpi_rate_hz=-1)


def test_status_view_decodes_arm64_words() -> None:
    lay = plan_layout_aarch64(16 * MIB, 2, 8 * MIB)
    fake = FakeRam(16 * MIB)
    s0 = fake.u64(lay.status_gpa(0), 64)
    s0[abi.WL_S_MAGIC] = abi.WL_STATUS_MAGIC
    s0[abi.WL_S_STATE] = abi.WL_STATE_WRITING
    s0[abi.WL_S_HEARTBEAT] = 12
    s0[ab.WLA_S_ITS_STATE] = ab.WLA_ITS_READY
    s0[ab.WLA_S_LPIS_EXPECTED], s0[ab.WLA_S_LPIS_RECEIVED] = 40, 39
    s0[ab.WLA_S_LPI_OUTSTANDING] = 1 << 3
    s0[ab.WLA_S_COUNTER_HZ] = 62_500_000
    s1 = fake.u64(lay.status_gpa(1), 64)
    s1[abi.WL_S_MAGIC] = abi.WL_STATUS_MAGIC
    s1[abi.WL_S_STATE] = ab.WLA_STATE_FAULT
    s1[ab.WLA_S_FAULT_ESR] = 0x96000050
    s1[ab.WLA_S_FAULT_ELR] = 0x40001234
    s1[ab.WLA_S_FAULT_VECTOR] = 4
    s1[ab.WLA_S_ITS_STATE] = ab.WLA_ITS_FAILED
    s1[ab.WLA_S_ITS_ERROR] = ab.WLA_ERR_CMD_TIMEOUT
    first, second = Arm64WorkloadGuest(lay).status(fake.ram)
    assert first.started and first.state is GuestPhase.WRITING and first.heartbeat == 12
    assert (first.its_state, first.its_error, first.fault) == ("ready", None, None)
    assert (first.lpis_expected, first.lpis_received, first.lpi_outstanding) == (40, 39, 8)
    assert first.counter_hz == 62_500_000
    assert second.state is GuestPhase.UNKNOWN and second.fault is not None
    assert second.fault.exception_class == 0x25 and second.fault.elr == 0x40001234
    assert second.its_state == "failed" and second.its_error is not None
    assert "CREADR" in second.its_error


SEED = 0x5EED


@pytest.fixture
def guest_ram() -> Iterator[tuple[FakeRam, Arm64Layout]]:
    """RAM as the guest would leave it: 3 vCPUs, some pages written a few times, some never."""
    lay = plan_layout_aarch64(8 * MIB, 3, 300 * 4096)
    fake = FakeRam(8 * MIB)
    fake.u64(lay.params + 8 * abi.WL_P_SEED)[0] = SEED
    rng = np.random.default_rng(1)
    gens = rng.integers(1, 2**32, lay.ws_pages, dtype=np.uint64)
    gens[rng.random(lay.ws_pages) < 0.2] = 0
    idx = np.arange(lay.ws_pages, dtype=np.uint64)
    vcpus = np.repeat(np.arange(3, dtype=np.uint64), [lay.share(v)[1] for v in range(3)])
    rendered = render_pages(lay.ws_base + idx * np.uint64(4096), idx, gens, vcpus, SEED)
    rendered[gens == 0] = 0
    ws = lay.ws_base - ab.RAM_BASE
    fake.ram[ws : ws + lay.ws_bytes] = rendered.view(np.uint8).ravel()
    gen = lay.gen - ab.RAM_BASE
    fake.ram[gen : gen + 4 * lay.ws_pages] = gens.astype(np.uint32).view(np.uint8)
    yield fake, lay


def test_checker_reads_ram_by_gpa(guest_ram: tuple[FakeRam, Arm64Layout]) -> None:
    fake, lay = guest_ram
    guest = Arm64WorkloadGuest(lay)
    report = guest.verify(fake.ram)
    assert report.ok and report.pages_checked == 300 and 200 < report.pages_written < 300
    gens = fake.ram[lay.gen - ab.RAM_BASE :][: 4 * lay.ws_pages].view(np.uint32)
    page = int(np.flatnonzero(gens)[5])
    fake.ram[lay.ws_base - ab.RAM_BASE + page * 4096 + 1000] ^= 1
    report = guest.verify(fake.ram)
    assert (report.bad_pages, report.bad_checksum) == (1, 1)
    assert report.first_bad == (lay.ws_base + page * 4096,)
    fake.u64(lay.status_gpa(0) + 8 * abi.WL_S_BUSY_PAGE)[0] = page + 1  # in flight: not judged
    assert guest.verify(fake.ram).ok


def test_pages_of_names_memslot_pages() -> None:
    lay = plan_layout_aarch64(64 * MIB, 1, 4 * MIB)
    guest = Arm64WorkloadGuest(lay)
    assert guest.pages_of("itt") == ((lay.its_itt - ab.RAM_BASE) // 4096,)
    assert len(guest.pages_of("its device table")) == 16
    assert guest.pages_of("lpi pending table") == ((lay.lpi_pend - ab.RAM_BASE) // 4096,)


# ---- a boot under QEMU's own GICv3 + ITS (TCG, no KVM) ----------------------------------------

QEMU = "qemu-system-aarch64"

# The image, the parameter page and a stub, in one ELF that QEMU boots as a bare-metal kernel; a
# zero-filled tail past the working set moves QEMU's device tree above the guest's layout. The
# stub does what the VMM does under KVM: x0 = vCPU index, x1 = parameter page; vCPU 0 first
# starts vCPU 1 with PSCI CPU_ON (QEMU's secondaries start powered off).
SMOKE_S = """
    .section .text, "ax"
    .incbin "{image}"
    .org {stub_offset:#x}
    .globl stub
stub:
    mrs x0, mpidr_el1
    and x0, x0, #0xff
    cbnz x0, 1f
    ldr x0, =0xc4000003
    mov x1, #1
    ldr x2, ={stub:#x}
    mov x3, #0
    hvc #0
    mov x0, #0
1:  ldr x1, ={params:#x}
    ldr x2, ={entry:#x}
    br x2
    .ltorg
    .org {params_offset:#x}
    .incbin "{params_file}"
    .org {end_offset:#x}
"""


class Qmp:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline, "QEMU's QMP socket never came up"
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        self.file.readline()  # greeting
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "error" in reply:
                raise AssertionError(f"QMP {name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed (Debian: qemu-system-arm)")
def test_boots_under_qemu_tcg_with_its_and_lpis(built: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ = built
    vcpus, memory = 2, 64 * MIB
    lay = plan_layout_aarch64(memory, vcpus, 1 * MIB)
    params = WorkloadParams(vcpus=vcpus, working_set_bytes=1 * MIB, dirty_rate_mib_s=2)
    (tmp_path / "params.bin").write_bytes(ab.params_page(lay, params, ItsSettings(lpi_rate_hz=200)))
    stub = ab.CODE_GPA + ab.CODE_MAX - 0x1000
    assert image.stat().st_size <= stub - ab.CODE_GPA
    (tmp_path / "smoke.S").write_text(
        SMOKE_S.format(
            image=image,
            stub_offset=stub - ab.CODE_GPA,
            stub=stub,
            params=lay.params,
            entry=lay.entry,
            params_offset=lay.params - ab.CODE_GPA,
            params_file=tmp_path / "params.bin",
            end_offset=lay.ws_end - ab.CODE_GPA,
        )
    )
    gcc = build._cross_tool("gcc")
    subprocess.run([gcc, "-c", str(tmp_path / "smoke.S"), "-o", str(tmp_path / "smoke.o")], check=True)
    subprocess.run(
        [
            gcc,
            "-nostdlib",
            "-static",
            "-no-pie",
            f"-Wl,-Ttext={ab.CODE_GPA:#x}",
            "-Wl,-e,stub",
            str(tmp_path / "smoke.o"),
            "-o",
            str(tmp_path / "smoke.elf"),
        ],
        check=True,
    )
    qmp_path = tmp_path / "qmp.sock"
    log = (tmp_path / "qemu.log").open("wb")  # QEMU's complaints, if it has any
    qemu = subprocess.Popen(
        [
            QEMU,
            "-M",
            "virt,gic-version=3,its=on",
            "-cpu",
            "max",
            "-smp",
            str(vcpus),
            "-m",
            str(memory >> 20),
            "-nographic",
            "-nodefaults",
            "-no-shutdown",
            "-kernel",
            str(tmp_path / "smoke.elf"),
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    guest = Arm64WorkloadGuest(lay)
    dump = tmp_path / "ram.bin"
    try:
        qmp = Qmp(qmp_path)

        def snapshot() -> npt.NDArray[np.uint8]:
            qmp.command("pmemsave", val=ab.RAM_BASE, size=memory, filename=str(dump))
            return np.fromfile(dump, np.uint8)

        deadline = time.monotonic() + 60
        while True:
            status = guest.status(snapshot())
            if all(s.pages_written > 0 for s in status) and status[0].lpis_received >= 20:
                break
            assert all(s.fault is None for s in status), status
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        qmp.command("stop")
        ram = snapshot()
        qmp.close()
    finally:
        qemu.kill()
        qemu.wait()
        log.close()
    status = guest.status(ram)
    assert all(s.started and s.heartbeat > 0 and s.verify_errors == 0 for s in status), status
    s0 = status[0]
    assert (s0.its_state, s0.its_error, s0.lpis_unexpected) == ("ready", None, 0)
    assert s0.counter_hz > 0 and status[1].its_state == "off"
    # Every INT sent is received or still outstanding (one more if stopped in between).
    in_flight = bin(s0.lpi_outstanding).count("1")
    assert 0 <= s0.lpis_received + in_flight - s0.lpis_expected <= 1
    report = guest.verify(ram)
    assert report.ok and report.pages_written > 0, report
