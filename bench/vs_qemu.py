"""QEMU and migrated side by side, in one run, interleaved (issue 12); one JSON object out.

Two cases, each engine measured in turn (QEMU, migrated, QEMU, migrated, ...) so the state of
this nested host (its memory backing swings a lot, HOST-NOTES.md) hits both alike:

* boot sector: the project's boot sector (migrated/guests/x86_64/bootsector) rewrites
  `--region-mib` of RAM in emulated 32-bit code, in a 1-vCPU guest of `--memory-mib`. QEMU boots it
  from a raw disk image through SeaBIOS; migrated loads it as a raw guest. Each line (an engine at
  a downtime limit; migrated with verify off, as QEMU does not verify, and with verify full)
  migrates its guest ping-pong `--migrations` times. Between its migrations a line's guest is
  paused, so only one guest runs at a time; it runs `--settle-s` on its host before each
  migration. After every completed migration the target's memory is checked with the checker the
  tests use (`check_region`: every word holds the pass the guest's loop says it must); QEMU's
  target is started with -S so it stays paused after loading, and its RAM (read with pmemsave)
  is also compared page by page with the paused source's. QEMU's figures come from
  `query-migrate` and from its timestamped MIGRATION/STOP events: its own downtime ends when the
  source has sent everything; "downtime to target loaded" ends when the target has loaded it
  (for migrated: its downtime without the COMMIT/RUNNING round trip), the like-for-like figure.
  QEMU's dirty-ring mode (`-accel kvm,dirty-ring-size=65536`) runs as its own line unless
  `--no-qemu-ring`, and so does QEMU over TLS (`tls-creds-x509`, both ends' certificates checked,
  made with openssl for the run) at the first limit unless `--no-qemu-tls`: QEMU doing the same
  work as migrated, whose every byte on the wire is authenticated and encrypted.
* bulk copy: a paused guest of `--bulk-mib`, every page non-zero, into a fresh target. QEMU's
  source RAM is a pre-filled shared file (started with -S, so no code runs), its target a fresh
  memory-backend-ram; migrated's guest is the workload guest, which writes its whole working set
  once and is paused, then migrates ping-pong (each target allocates fresh guest RAM: the RAM
  reserve off, `vm.ram_reserve_mib = 0`, unless `--daemon-config` sets it). MiB/s is
  bytes moved over the migration's total time for both (QEMU's own `mbps` and migrated's bulk
  phase rate are reported too). QEMU over TLS takes its turn after QEMU in the clear unless
  `--no-qemu-tls`. iperf3, one stream on loopback, runs before and after.
  Unless `--no-bulk-clear`, the same guest also migrates in the clear (`peer.auth = "none"`, test-only
  `allow_unauthenticated`; NOT a production mode, DESIGN.md 6), interleaved: `crypto_share` prices the AEAD.
  Unless `--no-bulk-reserve`, a third pair of daemons with their defaults migrates it too: from its
  second run on the target's RAM is the zeroed file the VM left there (the RAM reserve), reported
  apart (`migrated_ram_reserve`: the runs that took it), never as the fresh-target figure.
* the boot-sector lines run the daemons' defaults, RAM reserve included: each run says whether the
  target's RAM came from it (`ram_from_reserve`).

Figures are medians with [min, max] ranges; `targets` evaluates issue 12's goals on them.
Extra daemon configuration (keys other engineers add) passes through without code changes:
`--daemon-config migration.streams=4 --daemon-config vm.memory_backing=shmem-huge`
(SECTION.KEY=VALUE, VALUE in TOML; a bare word is taken as a string).

    python bench/vs_qemu.py [--quick] [--migrations 5] [--no-qemu-ring] [--daemon-config K=V ...] > RUN.json
    python bench/vs_qemu.py --table RUN.json     # the Markdown tables of bench/RESULTS.md

Needs qemu-system-x86_64 (Debian: apt-get install -y qemu-system-x86), iperf3 and openssl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "migration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.py

import numpy as np  # noqa: E402
import qemu_vm  # noqa: E402
from daemons import DaemonProcess, free_port, wait_for, wait_migration  # noqa: E402
from daemonconfig import write_daemon_config  # noqa: E402
from vs_qemu_report import crypto_share, evaluate, markdown  # noqa: E402

from migrated.guests.x86_64.bootsector import PASSES_ADDR, BootSectorParams, check_region  # noqa: E402
from migrated.guests.x86_64.bootsector.build import build_boot_sector, write_image  # noqa: E402

MIB = 1 << 20
PAGE = 4096
VM = "bs"


# ---------------------------------------------------------------------------- summaries


def spread(values: Iterable[float | None]) -> dict[str, Any]:
    """Median and [min, max] of the values that exist; None where there are none."""
    present = sorted(float(v) for v in values if v is not None)
    if not present:
        return {"median": None, "range": None, "n": 0}
    return {
        "median": round(statistics.median(present), 1),
        "range": [round(present[0], 1), round(present[-1], 1)],
        "n": len(present),
    }


def summarize_line(line: dict[str, Any]) -> dict[str, Any]:
    runs = line["runs"]
    done = [r for r in runs if r["completed"]]
    return {
        "completed": f"{len(done)}/{len(runs)}",
        "memory_exact": f"{sum(1 for r in done if r['memory'] and r['memory']['ok'])}/{len(done)}",
        "total_ms": spread(r["total_ms"] for r in done),
        "downtime_ms": spread(r["downtime_ms"] for r in done),
        "downtime_to_target_loaded_ms": spread(r.get("downtime_to_target_loaded_ms") for r in done),
        "guest_downtime_ms": spread(r.get("guest_downtime_ms") for r in done),
        "total_ms_events": spread(r.get("total_ms_events") for r in done),
        "over_limit": sum(1 for r in done if r["downtime_ms"] is not None and r["downtime_ms"] > line["limit_ms"]),
        **(
            {"ram_from_reserve": f"{sum(1 for r in done if r.get('ram_from_reserve'))}/{len(done)}"}
            if line["engine"] == "migrated"
            else {}
        ),
        **{
            key: _step_spreads(done, key)
            for key in ("phase_steps_ms", "target_phase_steps_ms")
            if line["engine"] == "migrated"
        },
    }


def _step_spreads(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Median and range of every step in the runs' `key` dicts, where it ran."""
    names = list(dict.fromkeys(step for r in runs for step in r.get(key, {})))
    return {step: spread(r[key][step] for r in runs if step in r.get(key, {})) for step in names}


# ---------------------------------------------------------------------------- memory checks


def check_ram(ram: np.ndarray[Any, np.dtype[np.uint8]], params: BootSectorParams) -> dict[str, Any]:
    region = check_region(ram, params)
    return {
        "ok": region.ok,
        "bad_words": region.bad_words,
        "first_bad": None if region.first_bad is None else hex(region.first_bad),
        "passes_done": region.passes_done,
        "newer_words": region.newer_words,
    }


def check_qemu_ram(source_file: Path, target_file: Path, params: BootSectorParams) -> dict[str, Any]:
    """The paused target's RAM by the guest's own stamps, and page by page against the paused
    source's RAM. Pages that differ outside the guest's own data (its region and the pass counter)
    are listed but do not fail the check: QEMU's firmware area (0xe0000-0xfffff) is not the guest's."""
    source = np.fromfile(source_file, np.uint8).reshape(-1, PAGE)
    target = np.fromfile(target_file, np.uint8).reshape(-1, PAGE)
    result = check_ram(target.reshape(-1), params)
    differing = np.flatnonzero((source != target).any(axis=1)) * PAGE
    guest_data = ((differing >= params.base) & (differing < params.end)) | (differing == PASSES_ADDR // PAGE * PAGE)
    result["pages_differing_from_source"] = [hex(int(a)) for a in differing[:16]]
    result["guest_pages_differing_from_source"] = int(np.count_nonzero(guest_data))
    result["ok"] = result["ok"] and not guest_data.any()
    return result


# ---------------------------------------------------------------------------- boot sector: QEMU


@dataclass
class QemuLine:
    """QEMU migrating the boot-sector guest ping-pong at one downtime limit."""

    label: str
    limit_ms: int
    ring_entries: int
    binary: str
    work: Path
    ram_dir: Path
    disk: Path
    params: BootSectorParams
    memory_mib: int
    timeout_s: float
    tls_certificates: Path | None = None  # over TLS (x509) with these, else in the clear (QEMU's default)
    current: qemu_vm.QemuProcess | None = None
    serial: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)

    def dump(self, process: qemu_vm.QemuProcess) -> Path:
        """The paused guest's RAM, as QEMU reads it (pmemsave: guest-physical from 0)."""
        path = self.ram_dir / f"{process.name}.ram"
        process.execute("pmemsave", val=0, size=self.memory_mib * MIB, filename=str(path))
        return path

    def _process(self, *extra: str) -> qemu_vm.QemuProcess:
        self.serial += 1
        # Anonymous RAM, as QEMU has by default: a shared file on tmpfs would make its target
        # fault in every page the stream touches (zero pages too) and lengthen its load by
        # hundreds of ms here; the memory check reads RAM with pmemsave instead.
        argv = qemu_vm.machine_args(
            self.binary, self.memory_mib, qemu_vm.ram_backend(self.memory_mib), self.ring_entries
        )
        # Source and target open the same image on one host: no image locks between them.
        argv += ["-drive", f"file={self.disk},format=raw,if=ide,file.locking=off", *extra]
        if self.tls_certificates is not None:
            argv += qemu_vm.tls_args(self.tls_certificates)
        return qemu_vm.QemuProcess(f"{self.label}-{self.serial}", self.work, argv).start()

    def start(self) -> None:
        self.current = self._process()
        vm = self.current
        wait_for(lambda: "protected mode" in vm.console(), timeout=60, what=f"{vm.name} in protected mode")
        vm.execute("stop")

    def migrate_once(self, settle_s: float) -> None:
        started = time.monotonic()
        source = self.current
        assert source is not None
        # Started before the source's guest runs again, so its start-up does not eat the guest's time.
        target = self._process("-S", "-incoming", "defer")
        port = free_port()
        tls = self.tls_certificates is not None
        qemu_vm.listen_incoming(target, port, tls)
        source.execute("cont")
        time.sleep(settle_s)  # the guest dirties at its own pace on this host before the migration
        info = qemu_vm.migrate(source, port, self.limit_ms, self.timeout_s, tls)
        completed = info.get("status") == "completed"
        ram = info.get("ram", {})
        run: dict[str, Any] = {
            "from": source.name,
            "completed": completed,
            "status": info.get("status"),
            "cancelled_after_s": info.get("cancelled_after_s"),
            "total_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"),
            "expected_downtime_ms": info.get("expected-downtime"),
            "rounds": ram.get("dirty-sync-count"),
            "ram_transferred_mib": round(ram.get("transferred", 0) / MIB, 1),
            "mbps": ram.get("mbps"),
            "memory": None,
        }
        if completed:
            run["target_state"] = qemu_vm.wait_incoming_done(target)
            # QEMU's own downtime ends when the source has sent everything; the guest runs again
            # only once the target has loaded it: timed from QEMU's events (one host clock).
            loaded = qemu_vm.wait_event_time(target, "MIGRATION", status="completed")
            events = info["events_s"]
            run["total_ms_events"] = _ms(events["completed"], events["setup"])
            run["downtime_ms_events"] = _ms(events["completed"], events["stop"])
            run["downtime_to_target_loaded_ms"] = _ms(loaded, events["stop"])
            source_ram, target_ram = self.dump(source), self.dump(target)
            run["memory"] = check_qemu_ram(source_ram, target_ram, self.params)
            qemu_vm.remove(source_ram)
            qemu_vm.remove(target_ram)
            source.quit()
            self.current = target
        else:
            target.quit()
            source.execute("stop")
        run["step_s"] = round(time.monotonic() - started, 2)  # the whole step, checks included
        self.runs.append(run)

    def close(self) -> None:
        if self.current is not None:
            self.current.quit()
            self.current = None

    def report(self) -> dict[str, Any]:
        mode = f"dirty ring {self.ring_entries} entries" if self.ring_entries else "bitmap (default)"
        if self.tls_certificates is not None:
            mode += ", over TLS (x509)"
        line = {"engine": "qemu", "dirty_tracking": mode, "limit_ms": self.limit_ms, "runs": self.runs}
        return {**line, "summary": summarize_line(line)}


# ---------------------------------------------------------------------------- boot sector: migrated


def start_daemons(work: Path, label: str, config: Path) -> tuple[DaemonProcess, DaemonProcess]:
    key = work / f"{label}.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    extra = ("--config", str(config))
    a = DaemonProcess(f"{label}-a", work, key, extra_args=extra).start()
    try:
        b = DaemonProcess(f"{label}-b", work, key, extra_args=extra).start()
    except BaseException:
        a.stop()
        raise
    return a, b


@dataclass
class MigratedLine:
    """migrated migrating the boot-sector guest ping-pong at one limit and verify mode, between
    its own pair of daemons (the costs a daemon learns stay with its line)."""

    label: str
    limit_ms: int
    verify: str
    work: Path
    config: Path
    image: Path
    params: BootSectorParams
    memory_mib: int
    daemons: tuple[DaemonProcess, DaemonProcess] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> None:
        self.daemons = start_daemons(self.work, self.label, self.config)
        a = self.daemons[0]
        a.call(
            "vm.create",
            name=VM,
            memory_mib=self.memory_mib,
            vcpus=1,
            guest="raw",
            image=str(self.image),
            load_addr=0x7C00,
            entry="real",
        )
        wait_for(
            lambda: "protected mode" in a.call("vm.console", name=VM)["output"],
            timeout=60,
            what=f"{self.label} in protected mode",
        )
        a.call("vm.pause", name=VM)

    def migrate_once(self, settle_s: float) -> None:
        started = time.monotonic()
        assert self.daemons is not None
        source, target = self.daemons
        source.call("vm.resume", name=VM)
        time.sleep(settle_s)  # the guest dirties at its own pace on this host before the migration
        source.call("migrate", name=VM, to=target.address, downtime_limit_ms=self.limit_ms, verify=self.verify)
        stats = wait_migration(source, VM, timeout=300)
        completed = stats["state"] == "completed"
        run: dict[str, Any] = {
            "from": source.name,
            "completed": completed,
            "status": stats["state"],
            "error": stats.get("error"),
            "total_ms": _round(stats.get("total_ms")),
            "downtime_ms": _round(stats.get("downtime_ms")),
            "guest_downtime_ms": _round(stats.get("guest_downtime_ms")),
            "setup_ms": _round(stats.get("setup_ms")),
            "predicted_downtime_ms": _round(stats.get("predicted_downtime_ms")),
            "downtime_breakdown_ms": stats.get("downtime_breakdown_ms"),
            "rounds": stats.get("rounds"),
            "final_pages": stats.get("final_pages"),
            "bytes_sent_mib": round(stats.get("bytes_sent", 0) / MIB, 1),
            "ring_full_exits": stats.get("ring_full_exits"),
            # Where the total goes, step by step, on each side (the stats' phase_steps_ms;
            # "overlapped.*" steps ran beside the others).
            "phase_steps_ms": stats.get("phase_steps_ms") or {},
            "target_phase_steps_ms": {},
            "memory": None,
        }
        if completed:
            incoming = wait_migration(target, VM, timeout=30)
            if incoming.get("migration_id") == stats.get("migration_id"):
                run["target_phase_steps_ms"] = incoming.get("phase_steps_ms") or {}
                # The RAM file of the VM that left this daemon before (its RAM reserve): disclosed,
                # as QEMU's target always starts from fresh memory.
                run["ram_from_reserve"] = incoming.get("ram_from_reserve")
            # Up to the target's LOADED, as QEMU's figure of the same name: without the COMMIT
            # round trip and the resume, which QEMU's -S target (kept paused for the check) skips.
            resume = (stats.get("downtime_breakdown_ms") or {}).get("commit_to_running")
            if stats.get("downtime_ms") is not None and resume is not None:
                run["downtime_to_target_loaded_ms"] = _round(stats["downtime_ms"] - resume)
            target.call("vm.pause", name=VM)
            dump = self.work / f"{self.label}.dump"
            target.call("vm.dump", name=VM, file=str(dump))
            run["memory"] = check_ram(np.fromfile(dump, np.uint8), self.params)
            dump.unlink()
            self.daemons = (target, source)
        else:
            source.call("vm.pause", name=VM)
        run["step_s"] = round(time.monotonic() - started, 2)  # the whole step, checks included
        self.runs.append(run)

    def close(self) -> None:
        if self.daemons is not None:
            for daemon in self.daemons:
                daemon.stop()
            self.daemons = None

    def report(self) -> dict[str, Any]:
        line = {"engine": "migrated", "verify": self.verify, "limit_ms": self.limit_ms, "runs": self.runs}
        return {**line, "summary": summarize_line(line)}


def _ms(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else round((end - start) * 1e3, 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 1)


def boot_sector(args: argparse.Namespace, binary: str, work: Path, ram_dir: Path, config: Path) -> dict[str, Any]:
    params = BootSectorParams(bytes=args.region_mib * MIB, print_every=1)
    params.check_fits(args.memory_mib * MIB)
    image = work / "boot.bin"
    write_image(image, build_boot_sector(params))
    disk = work / "disk.img"
    with open(disk, "wb") as out:  # a 1 MiB raw disk whose first sector is the boot sector
        out.write(image.read_bytes())
        out.truncate(MIB)
    certificates = None if args.no_qemu_tls else qemu_vm.tls_certificates(work / "qemu-tls")
    lines: list[QemuLine | MigratedLine] = []
    for limit in args.limits:
        qemu_modes = [0] if (args.no_qemu_ring or limit != args.limits[0]) else [0, args.qemu_ring_entries]
        for ring in qemu_modes:
            label = f"q{'ring' if ring else ''}{limit}"
            lines.append(
                QemuLine(label, limit, ring, binary, work, ram_dir, disk, params, args.memory_mib, args.qemu_timeout_s)
            )
            if ring == 0:
                lines.append(MigratedLine(f"m{limit}off", limit, "off", work, config, image, params, args.memory_mib))
            if ring == 0 and certificates is not None and limit == args.limits[0]:
                # QEMU doing what migrated does: every byte authenticated and encrypted.
                lines.append(
                    QemuLine(
                        f"qtls{limit}",
                        limit,
                        0,
                        binary,
                        work,
                        ram_dir,
                        disk,
                        params,
                        args.memory_mib,
                        args.qemu_timeout_s,
                        certificates,
                    )
                )
        if not args.no_verify_full:
            lines.append(MigratedLine(f"m{limit}full", limit, "full", work, config, image, params, args.memory_mib))
    try:
        for line in lines:
            line.start()
        for _ in range(args.migrations):
            for line in lines:  # Q, M, Q, M ...: every line once per round
                line.migrate_once(args.settle_s)
    finally:
        for line in lines:
            line.close()
    return {
        "guest": {
            "memory_mib": args.memory_mib,
            "vcpus": 1,
            "region_mib": args.region_mib,
            "settle_s": args.settle_s,
            "migrations_per_line": args.migrations,
        },
        "lines": {line.label: line.report() for line in lines},
    }


# ---------------------------------------------------------------------------- bulk copy


def iperf3_mib_s(seconds: float, attempts: int = 3) -> float:
    """One iperf3 stream on loopback, with a fresh server per attempt: a client that exits 0 with
    no result in its JSON (seen once: the run's JSON was lost with it) is a failed attempt."""
    failures = []
    for _ in range(attempts):
        report = _iperf3_once(seconds)
        received = report.get("end", {}).get("sum_received", {}).get("bits_per_second")
        if received is not None:
            return float(received) / 8 / MIB
        failures.append(str(report.get("error", report))[-300:])
    raise RuntimeError(f"iperf3 failed {attempts} times: {failures}")


def _iperf3_once(seconds: float) -> dict[str, Any]:
    """`iperf3 -s -1` serves exactly one test, so no probe may connect first: the client
    retries until the server listens."""
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            done = subprocess.run(
                ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"iperf3 failed: {done.stdout[-500:]} {done.stderr[-500:]}")
            time.sleep(0.05)
    finally:
        # The client's own report is the figure; a server that did not end with its one test
        # (seen once after a retried connect) must not cost the whole run's JSON.
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": f"no JSON from the client: {done.stdout[-300:]}"}
    return report


def fill_nonzero(path: Path, size_mib: int) -> None:
    """A file whose every page is non-zero (random bytes, one 1 MiB block repeated)."""
    block = np.random.default_rng(12).integers(1, 256, MIB, dtype=np.uint8).tobytes()
    with open(path, "wb") as out:
        for _ in range(size_mib):
            out.write(block)


def qemu_bulk_once(
    binary: str, work: Path, source_ram: Path, size_mib: int, serial: int, tls_certificates: Path | None = None
) -> dict[str, Any]:
    """`tls_certificates`: over TLS (x509), the same protection as migrated's sealed streams."""
    tls = [] if tls_certificates is None else qemu_vm.tls_args(tls_certificates)
    name = "bulk-tls" if tls else "bulk"
    source = qemu_vm.QemuProcess(
        f"{name}-src-{serial}",
        work,
        [*qemu_vm.machine_args(binary, size_mib, qemu_vm.file_backend(source_ram, size_mib)), "-S", *tls],
    )
    target = qemu_vm.QemuProcess(
        f"{name}-dst-{serial}",
        work,
        [*qemu_vm.machine_args(binary, size_mib, qemu_vm.ram_backend(size_mib)), "-S", "-incoming", "defer", *tls],
    )
    try:
        source.start()
        target.start()
        port = free_port()
        qemu_vm.listen_incoming(target, port, bool(tls))
        info = qemu_vm.migrate(source, port, 300, timeout=300, tls=bool(tls))
        if info.get("status") != "completed":
            raise RuntimeError(f"QEMU bulk migration did not complete: {info}")
        qemu_vm.wait_incoming_done(target)
    finally:
        source.quit()
        target.quit()
    ram = info["ram"]
    return {
        "mib_s": round(ram["transferred"] / MIB / (info["total-time"] / 1e3), 1) if info.get("total-time") else None,
        "total_ms_events": _ms(info["events_s"]["completed"], info["events_s"]["setup"]),
        "qemu_mbps_as_mib_s": round(ram["mbps"] * 1e6 / 8 / MIB, 1),
        "total_ms": info["total-time"],
        "downtime_ms": info.get("downtime"),
        "transferred_mib": round(ram["transferred"] / MIB, 1),
        "normal_pages": ram.get("normal"),
        "zero_pages": ram.get("duplicate"),
    }


CLEAR_SETTINGS = ["peer.auth=none", "peer.allow_unauthenticated=true"]  # test-only, never a production mode
NO_RESERVE = "vm.ram_reserve_mib=0"  # every bulk target writes fresh RAM, as QEMU's


def migrated_bulk_start(work: Path, config: Path, size_mib: int, label: str) -> tuple[DaemonProcess, DaemonProcess]:
    """A paused workload guest of `size_mib` whose every page the guest has written."""
    a, b = start_daemons(work, label, config)
    working_set = size_mib - 8  # all but the guest's own metadata
    a.call("vm.create", name="bulk", memory_mib=size_mib, vcpus=1, dirty_rate_mib_s="max", working_set_mib=working_set)
    pages = working_set * MIB // PAGE
    wait_for(
        lambda: a.call("vm.show", name="bulk")["guest"]["pages_written"] >= pages,
        timeout=300,
        what="the guest to write its whole working set",
    )
    a.call("vm.set", name="bulk", dirty_rate_mib_s=0)
    a.call("vm.pause", name="bulk")
    return a, b


def migrated_bulk_once(source: DaemonProcess, target: DaemonProcess) -> dict[str, Any]:
    source.call("migrate", name="bulk", to=target.address, verify="off")
    stats = wait_migration(source, "bulk", timeout=300)
    if stats["state"] != "completed":
        raise RuntimeError(f"migrated bulk migration did not complete: {stats.get('error')}")
    incoming = wait_migration(target, "bulk", timeout=30)
    return {
        "ram_from_reserve": incoming.get("ram_from_reserve"),
        "mib_s": round(stats["bytes_sent"] / MIB / (stats["total_ms"] / 1e3), 1),
        "bulk_phase_mib_s": round(stats["bulk_bytes"] / MIB / (stats["bulk_ms"] / 1e3), 1),
        "total_ms": _round(stats["total_ms"]),
        "downtime_ms": _round(stats.get("downtime_ms")),
        "transferred_mib": round(stats["bytes_sent"] / MIB, 1),
        "zero_pages": stats.get("zero_pages"),
    }


def bulk(args: argparse.Namespace, binary: str, work: Path, ram_dir: Path, config: Path) -> dict[str, Any]:
    source_ram = ram_dir / "bulk-source.ram"
    fill_nonzero(source_ram, args.bulk_mib)
    iperf = [iperf3_mib_s(args.iperf_seconds)]
    certificates = None if args.no_qemu_tls else qemu_vm.tls_certificates(work / "qemu-tls")
    qemu_runs: list[dict[str, Any]] = []
    qemu_tls_runs: list[dict[str, Any]] = []
    migrated_runs: list[dict[str, Any]] = []
    clear_runs: list[dict[str, Any]] = []
    reserve_runs: list[dict[str, Any]] = []
    pairs: list[tuple[DaemonProcess, DaemonProcess]] = []
    lines: list[list[dict[str, Any]]] = []
    # "Into a fresh target" (issue 12): the target's RAM reserve off, unless the operator set it.
    fresh = [] if any(s.strip().startswith("vm.ram_reserve_mib") for s in args.daemon_config) else [NO_RESERVE]
    try:
        fresh_config = write_daemon_config(work / "daemon-bulk.toml", [*args.daemon_config, *fresh])
        pairs.append(migrated_bulk_start(work, fresh_config, args.bulk_mib, "bulk"))
        lines.append(migrated_runs)
        if not args.no_bulk_clear:
            # The operator's settings stay, but for the peer's authentication, which this line sets.
            kept = [s for s in args.daemon_config if not s.strip().startswith(("peer.auth", "peer.allow_unauth"))]
            clear_config = write_daemon_config(work / "daemon-clear.toml", [*kept, *CLEAR_SETTINGS, *fresh])
            pairs.append(migrated_bulk_start(work, clear_config, args.bulk_mib, "bulk-clear"))
            lines.append(clear_runs)
        if not args.no_bulk_reserve:
            # The daemons' defaults: from its second run on, each target's RAM is the file the VM
            # left there the run before, zeroed (the RAM reserve).
            pairs.append(migrated_bulk_start(work, config, args.bulk_mib, "bulk-reserve"))
            lines.append(reserve_runs)
        for serial in range(args.bulk_runs):
            qemu_runs.append(qemu_bulk_once(binary, work, source_ram, args.bulk_mib, serial))
            if certificates is not None:
                qemu_tls_runs.append(qemu_bulk_once(binary, work, source_ram, args.bulk_mib, serial, certificates))
            # Sealed and clear take turns going first: neither always gets the memory just freed.
            order = range(len(pairs)) if serial % 2 == 0 else reversed(range(len(pairs)))
            for index in order:
                a, b = pairs[index]
                lines[index].append(migrated_bulk_once(a, b))
                pairs[index] = (b, a)  # ping-pong
    finally:
        for a, b in pairs:
            a.stop()
            b.stop()
        qemu_vm.remove(source_ram)
    iperf.append(iperf3_mib_s(args.iperf_seconds))
    result: dict[str, Any] = {
        "guest_mib": args.bulk_mib,
        "iperf3_one_stream_mib_s": {"runs": [round(x, 1) for x in iperf], **spread(iperf)},
        "qemu": {"runs": qemu_runs, "mib_s": spread(r["mib_s"] for r in qemu_runs)},
        "migrated": {
            "runs": migrated_runs,
            "mib_s": spread(r["mib_s"] for r in migrated_runs),
            "bulk_phase_mib_s": spread(r["bulk_phase_mib_s"] for r in migrated_runs),
        },
    }
    if qemu_tls_runs:
        result["qemu_tls"] = {"runs": qemu_tls_runs, "mib_s": spread(r["mib_s"] for r in qemu_tls_runs)}
    if clear_runs:  # stream protection off (peer.auth none, test-only allow_unauthenticated): prices the AEAD
        mib_s = {k: spread(r[k] for r in clear_runs) for k in ("mib_s", "bulk_phase_mib_s")}
        result["migrated_clear_not_production"] = {"runs": clear_runs, **mib_s}
        result["crypto_share"] = crypto_share(result)
    if reserve_runs:
        from_reserve = [r for r in reserve_runs if r["ram_from_reserve"]]
        result["migrated_ram_reserve"] = {
            "runs": reserve_runs,
            "from_reserve": f"{len(from_reserve)}/{len(reserve_runs)}",
            **{k: spread(r[k] for r in from_reserve) for k in ("mib_s", "bulk_phase_mib_s")},
        }
    return result


# ---------------------------------------------------------------------------- main


def _limits(text: str) -> list[int]:
    try:
        limits = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: downtime limits in ms, comma-separated (e.g. 300,30)") from None
    if not limits or any(x < 1 for x in limits):
        raise argparse.ArgumentTypeError(f"{text!r}: downtime limits in ms, each at least 1")
    return limits


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "kvm_pvm": Path("/sys/module/kvm_pvm").exists(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 migrations per line, 1 bulk run of 1 GiB, iperf3 1 s")
    parser.add_argument("--migrations", type=int, default=5, help="ping-pong migrations per boot-sector line")
    parser.add_argument("--limits", type=_limits, default=[300, 30], help="downtime limits (ms), first the main one")
    parser.add_argument("--memory-mib", type=int, default=150, help="boot-sector guest RAM")
    parser.add_argument("--region-mib", type=int, default=100, help="RAM the boot sector rewrites")
    parser.add_argument("--settle-s", type=float, default=0.5, help="guest run time before each migration")
    parser.add_argument("--no-qemu-ring", action="store_true", help="skip QEMU's dirty-ring line")
    parser.add_argument("--qemu-ring-entries", type=int, default=65536, help="QEMU's dirty-ring-size")
    parser.add_argument(
        "--no-qemu-tls", action="store_true", help="skip QEMU over TLS (x509), the same protection as migrated's"
    )
    parser.add_argument("--no-verify-full", action="store_true", help="skip migrated's verify=full lines")
    parser.add_argument("--qemu-timeout-s", type=float, default=20.0, help="cancel a QEMU migration after this long")
    parser.add_argument("--bulk-mib", type=int, default=2048, help="bulk-copy guest RAM")
    parser.add_argument("--bulk-runs", type=int, default=3, help="bulk migrations per engine, interleaved")
    parser.add_argument("--iperf-seconds", type=float, default=3.0, help="each iperf3 run (before and after)")
    parser.add_argument("--no-bulk-clear", action="store_true", help="skip the bulk copy without stream protection")
    parser.add_argument(
        "--no-bulk-reserve", action="store_true", help="skip the bulk copy into RAM from the target's reserve"
    )
    parser.add_argument("--skip-boot-sector", action="store_true", help="only the bulk copy")
    parser.add_argument("--skip-bulk", action="store_true", help="only the boot-sector guest")
    parser.add_argument(
        "--ram-dir", type=Path, default=Path("/dev/shm"), help="where QEMU's shared RAM files go (a tmpfs)"
    )
    parser.add_argument(
        "--daemon-config",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a migrated config setting for every daemon (repeatable; VALUE in TOML); default: none",
    )
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print the Markdown tables of a saved run's JSON, run nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.migrations, args.bulk_runs, args.bulk_mib, args.iperf_seconds = 2, 1, 1024, 1.0
    return args


def main() -> int:
    args = parse_args()
    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    binary = qemu_vm.qemu_binary()
    if binary is None:
        print(f"vs_qemu: {qemu_vm.MISSING}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "versions": {"qemu": qemu_vm.qemu_version(binary), "git": _git_head()},
        "daemon_config": args.daemon_config,
    }
    with (
        tempfile.TemporaryDirectory(prefix="bench-vs-qemu-") as tmp,
        tempfile.TemporaryDirectory(prefix="bench-vs-qemu-", dir=args.ram_dir) as ram_tmp,
    ):
        work, ram_dir = Path(tmp), Path(ram_tmp)
        config = write_daemon_config(work / "daemon.toml", args.daemon_config)
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        if not args.skip_boot_sector:
            steps.append(("boot_sector", lambda: boot_sector(args, binary, work, ram_dir, config)))
        if not args.skip_bulk:
            steps.append(("bulk", lambda: bulk(args, binary, work, ram_dir, config)))
        for name, step in steps:
            section_started = time.monotonic()
            results[name] = step()
            results[name]["wall_s"] = round(time.monotonic() - section_started, 1)
    results["targets"] = evaluate(results, args.limits)
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    return 0


def _git_head() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
