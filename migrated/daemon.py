"""The daemon: one trio loop that owns the control socket, the peer listener, the VMs and their
migrations (DESIGN sections 1-2). Services start with `nursery.start()`, so READY=1 means every
socket is listening. SIGTERM stops cleanly; SIGHUP reloads what can be reloaded.
"""

from __future__ import annotations

import math
import signal
import socket
from functools import partial
from pathlib import Path
from collections.abc import Awaitable, Callable


import trio

from . import faults
from .config import Config, ConfigError, load_config
from .control import ByteStream, RequestError, serve_control
from .devices import console_log_path
from .events import BUS, EventStream
from .metrics import DaemonMetrics
from .vmrecords import VmRecords
from .hosted import HostedVm, SpecError, VmSpec, VmState, create_local, vm_config
from .guests.x86_64.boot import pulse_irq
from .kvm.errors import KvmError
from .kvm.backing import MEMORY_BACKINGS, MemoryBackingError, RamBacking
from .kvm.memory import GuestMemory
from .kvm.ramreserve import MIB, RamReserve, ReserveLimits
from .kvm.system import Kvm
from .kvm.vcpu import ensure_kick_handler
from .logs import configure_logging, get_logger
from .migration.host import Command, CommandArgs, CommandReply, Migration
from .migration.idlelinks import IdleLinks
from .migration.incoming import Incoming
from .migration.downtime_models_file import load_models
from .migration.window import freeze_startup_objects
from .migration.service import start_migration_service
from .migration.stats import FinishedMigration
from .migration.target import Target
from .migration.warmlinks import WarmLinks
from .overcommit import Demand, OvercommitRefused, check_overcommit, host_size
from .rammount import RamDirectory
from .realtime import COST_WITHOUT_REALTIME, FIX, probe_realtime
from .vcpupriority import FIX as NICE_FIX, probe_nice_restore
from .cpulatency import CPU_LATENCY, FIX as CPU_LATENCY_FIX
from .sdnotify import Notifier
from .socket_access import restrict_control_socket
from .statedir import check_state_dir
from .vmshell import VmShell
from .warmup import warm_up


# A stopping daemon waits this long for an incoming copy's own discard (streams joined, its
# record on disk) before it removes the copy itself.
INCOMING_DISCARD_S = 10.0
# `migration status` of finished incoming migrations is kept for this many VM names.
FINISHED_KEPT = 256


# How long `vm create` waits for a new guest's first sign of life before it answers: a workload
# guest's first heartbeat comes within milliseconds, even on a loaded host within seconds; a raw
# guest in a tight loop may never exit, so for it the wait only catches an immediate failure.
FIRST_HEARTBEAT_S = 10.0
FIRST_EXIT_S = 0.5

# A source migration in one of these states still decides where the VM ends up: a stopping
# daemon waits for it.
HANDING_OVER = ("setup", "bulk", "rounds", "downtime", "cutover")


class Daemon:
    """The daemon's state and control commands; it is the `MigrationHost` of its migrations."""

    def __init__(self, config: Config, kvm: Kvm, notifier: Notifier) -> None:
        self.config = config
        self.kvm = kvm
        self.notifier = notifier
        self.vms: dict[str, HostedVm] = {}
        # Names claimed by a VM being built (vm create, an incoming migration): not in `vms` yet,
        # but taken, so that two builders of one name can never both win (DESIGN 6).
        self.reserved_names: set[str] = set()
        self.log = get_logger(component="daemon")
        self.nursery: trio.Nursery | None = None
        # Filled by the migration package; keeps the daemon ignorant of its internals.
        self.migrations: dict[str, Migration] = {}  # VM name -> its Source, Target, or FinishedMigration
        self.incoming = Incoming()  # incoming migrations in progress, and how recent ones ended
        self.node = f"{socket.gethostname()}/{config.peer.listen}"
        self.idle_links = IdleLinks()  # peers' idle links held open here
        self.warm_links = WarmLinks(lambda: self.config, self.node)  # ours to peers, served by the migration service
        # What the last run learned of each peer's downtime costs (None: read, or there was none).
        self.downtime_models, self.downtime_models_error = load_models(Path(config.daemon.state_dir))
        self.records = VmRecords(Path(config.daemon.state_dir))
        self.realtime_error = probe_realtime()  # None: the harvester can have SCHED_FIFO
        self.nice_error = probe_nice_restore()  # None: a migrating guest's vCPUs may yield (vcpupriority.py)
        # None: a downtime can keep idle CPUs polling (cpulatency.py); the request is made now and
        # constrains nothing until a downtime window holds it.
        self.cpu_latency_error = CPU_LATENCY.open()
        reserve_log = get_logger(component="ram_reserve")
        self.ram_reserve = RamReserve(
            lambda: ReserveLimits(self.config.vm.ram_reserve_mib * MIB, self.config.vm.ram_reserve_hold_s),
            report=lambda event, **fields: reserve_log.info(event, **fields),
        )
        self.ram_directory = RamDirectory(config.vm.memory_backing_dir, Path(config.daemon.state_dir), self.ram_reserve)
        self.vm_shell = VmShell(kvm, lambda: self.config)  # made and closed by its `serve`
        self.commands: dict[str, Command] = {
            "vm.create": self.cmd_vm_create,
            "vm.list": self.cmd_vm_list,
            "vm.show": self.cmd_vm_show,
            "vm.stop": self.cmd_vm_stop,
            "vm.set": self.cmd_vm_set,
            "vm.pause": self.cmd_vm_pause,
            "vm.dump": self.cmd_vm_dump,
            "vm.console": self.cmd_vm_console,
            "vm.resume": self.cmd_vm_resume,
            "vm.forget": self.cmd_vm_forget,
            "daemon.status": self.cmd_daemon_status,
            "events": self.cmd_events,
        }

    # ---- control commands ----------------------------------------------------------------

    async def handle(self, cmd: str, args: CommandArgs) -> CommandReply:
        handler = self.commands.get(cmd)
        if handler is None:
            raise RequestError(f"unknown command {cmd!r}; known: {', '.join(sorted(self.commands))}")
        return await handler(args)

    def reserve_name(self, name: str) -> bool:
        """Claim `name` for a VM about to be built; False if a VM or another builder has it.

        No await between the check and the claim: in trio that makes the pair atomic."""
        if name in self.vms or name in self.reserved_names:
            return False
        self.reserved_names.add(name)
        return True

    def release_name(self, name: str) -> None:
        """The builder is done: the VM is in `vms` now, or nothing of it exists."""
        self.reserved_names.discard(name)

    def hosted(self, args: CommandArgs) -> HostedVm:
        name = args.get("name")
        if not isinstance(name, str):
            raise RequestError('"name" (a string) is required')
        vm = self.vms.get(name)
        if vm is None:
            raise RequestError(f"no VM named {name!r} on this daemon")
        return vm

    async def cmd_vm_create(self, args: CommandArgs) -> CommandReply:
        args = dict(args)
        tracking = args.pop("dirty_tracking", None) or self.config.vm.dirty_tracking
        backing = args.pop("memory_backing", None) or self.config.vm.memory_backing
        if args.get("dirty_rate_mib_s") in ("max", "inf"):
            args["dirty_rate_mib_s"] = math.inf
        try:
            spec = VmSpec.from_wire(args)
            config = vm_config(
                spec,
                tracking,
                self.config.vm.ring_bytes,
                self.config.vm.harvest_interval_ms,
                self.memory_backing(backing),
            )
        except (SpecError, MemoryBackingError) as err:
            raise RequestError(str(err)) from None
        if not self.reserve_name(spec.name):
            raise RequestError(f"a VM named {spec.name!r} already exists on this daemon")
        try:
            warnings = self.check_overcommit(spec)
        except OvercommitRefused as err:
            raise RequestError(str(err)) from None
        try:
            hosted = await trio.to_thread.run_sync(create_local, self.kvm, spec, config, self.console_log(spec))
        except (KvmError, ValueError) as err:
            raise RequestError(f"cannot create VM {spec.name}: {err}") from None
        else:
            self.vms[spec.name] = hosted
            self.record_vm(hosted)
        finally:
            self.release_name(spec.name)
        for warning in hosted.warnings:
            self.log.warning("raw_image_warning", vm=spec.name, image=spec.image, warning=warning)
        self.log.info(
            "vm_created",
            vm=spec.name,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            # What it resolved to ("ring" or "bitmap"), not what was asked for ("auto").
            dirty_tracking=hosted.vm.dirty_tracking if hosted.vm is not None else config.dirty_tracking,
            memory_backing=config.memory_backing.kind,
        )
        self.update_status()
        # "created" means the guest ran: wait for its first sign of life, or for its failure.
        deadline = trio.current_time() + (FIRST_HEARTBEAT_S if hosted.guest is not None else FIRST_EXIT_S)
        while hosted.state is VmState.RUNNING and not hosted.has_run() and trio.current_time() < deadline:
            await trio.sleep(0.005)
        if hosted.state is VmState.FAILED:
            raise RequestError(
                f"VM {spec.name} failed as it started: {hosted.error} (kept for inspection: "
                f"`migratectl vm show {spec.name}`; `migratectl vm stop {spec.name}` removes it)"
            )
        return {**hosted.show(), "warnings": warnings}

    def memory_backing(self, kind: object) -> RamBacking:
        """The RAM backing `kind` names ("memfd", "shmem-huge", "hugetlbfs"), ready for a new VM
        (the huge-page tmpfs mounted if the daemon provides it); MemoryBackingError otherwise."""
        if not isinstance(kind, str) or kind not in MEMORY_BACKINGS:
            raise MemoryBackingError(f"memory backing {kind!r}: allowed are {', '.join(MEMORY_BACKINGS)}")
        return self.ram_directory.backing(kind)

    def check_overcommit(self, spec: VmSpec) -> list[str]:
        """Warnings (also logged) for a VM that overcommits the host; OvercommitRefused past the
        configured factors."""
        present = [Demand(h.spec.memory_mib, h.spec.vcpus) for h in self.vms.values()]
        warnings = check_overcommit(
            spec.name,
            Demand(spec.memory_mib, spec.vcpus),
            present,
            host_size(),
            self.config.vm.max_memory_overcommit,
            self.config.vm.max_vcpu_overcommit,
        )
        for warning in warnings:
            self.log.warning("overcommit", vm=spec.name, warning=warning)
        return warnings

    async def cmd_vm_list(self, args: CommandArgs) -> CommandReply:
        if args.get("lost"):
            return [lost.as_dict() for lost in self.records.lost()]
        return [
            {
                "name": h.name,
                "state": h.state.value,
                "memory_mib": h.spec.memory_mib,
                "vcpus": h.spec.vcpus,
                "guest": h.spec.guest,
            }
            for h in self.vms.values()
        ]

    async def cmd_vm_forget(self, args: CommandArgs) -> CommandReply:
        """Drop the record of a VM lost with a previous daemon process, once the operator dealt with it."""
        name = args.get("name")
        if not isinstance(name, str) or not self.records.forget(name):
            raise RequestError(f"no lost VM named {name!r} (see `migratectl vm list --lost`)")
        self.log.info("lost_vm_forgotten", vm=name)
        return {"name": name, "state": "forgotten"}

    async def cmd_vm_show(self, args: CommandArgs) -> CommandReply:
        return self.hosted(args).show()

    async def cmd_vm_stop(self, args: CommandArgs) -> CommandReply:
        hosted = self.hosted(args)
        if hosted.state in (VmState.MIGRATING, VmState.IN_DOUBT, VmState.INCOMING):
            raise RequestError(f"VM {hosted.name} is {hosted.state.value}: cancel or resolve its migration first")
        await self.remove_vm(hosted, "stopped by operator")
        return {"name": hosted.name, "state": "stopped"}

    async def cmd_vm_set(self, args: CommandArgs) -> CommandReply:
        """Change a running workload guest's dirty rate (MiB/s, or "max"), live: the whole VM's,
        or with `vcpu` that one vCPU's own."""
        hosted = self.hosted(args)
        rate = args.get("dirty_rate_mib_s")
        if rate in ("max", "inf"):
            rate = math.inf
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
            raise RequestError(f"dirty_rate_mib_s {rate!r}: a number >= 0, or 'max'")
        if hosted.guest is None or hosted.vm is None:
            raise RequestError(f"VM {hosted.name} has no workload guest to set a rate on")
        vcpu = args.get("vcpu")
        if vcpu is None:
            hosted.guest.set_rate(hosted.vm.write_guest, float(rate))
            return hosted.show()
        if isinstance(vcpu, bool) or not isinstance(vcpu, int):
            raise RequestError(f"vcpu {vcpu!r}: a vCPU index (an integer)")
        try:
            hosted.guest.set_vcpu_rate(hosted.vm.write_guest, vcpu, float(rate))
        except ValueError as err:
            raise RequestError(f"VM {hosted.name}: {err}") from None
        return hosted.show()

    async def cmd_vm_pause(self, args: CommandArgs) -> CommandReply:
        hosted = self.hosted(args)
        if hosted.state is not VmState.RUNNING or hosted.vm is None:
            raise RequestError(f"VM {hosted.name} is {hosted.state.value}: only a running VM pauses")
        await trio.to_thread.run_sync(hosted.vm.pause)
        hosted.state = VmState.PAUSED
        self.record_vm(hosted)
        self.log.info("vm_paused", vm=hosted.name)
        return hosted.show()

    async def cmd_vm_resume(self, args: CommandArgs) -> CommandReply:
        hosted = self.hosted(args)
        if hosted.state is not VmState.PAUSED or hosted.vm is None:
            raise RequestError(f"VM {hosted.name} is {hosted.state.value}: only a VM paused by the operator resumes")
        await trio.to_thread.run_sync(hosted.vm.resume)
        hosted.state = VmState.RUNNING
        self.record_vm(hosted)
        self.log.info("vm_resumed", vm=hosted.name)
        return hosted.show()

    async def cmd_vm_dump(self, args: CommandArgs) -> CommandReply:
        """Guest-physical memory to a file (like QEMU's pmemsave), from a paused VM only, so the
        file is one consistent moment of the guest."""
        hosted = self.hosted(args)
        vm = hosted.vm
        if vm is None or vm.memory is None or hosted.state not in (VmState.PAUSED, VmState.IN_DOUBT):
            raise RequestError(
                f"VM {hosted.name} is {hosted.state.value}: pause it first (`vm pause`), so the "
                "dump is one consistent moment"
            )
        path = args.get("file")
        to_client = args.get("stream") is True
        if not to_client and (not isinstance(path, str) or not path):
            raise RequestError('"file" (a path the daemon writes) or "stream": true is required')
        start = args.get("start", 0)
        length = args.get("length")
        if length is None and isinstance(start, int):
            region = vm.memory.region_of(start) if _in_ram(vm.memory, start) else None
            length = (region.guest_phys_addr + region.size - start) if region else 0
        if (
            not isinstance(start, int)
            or not isinstance(length, int)
            or start < 0
            or length <= 0
            or not _in_ram(vm.memory, start, length)
        ):
            ranges = ", ".join(f"[{r.guest_phys_addr:#x}, {r.guest_phys_addr + r.size:#x})" for r in vm.memory.regions)
            raise RequestError(f"range start={start!r} length={length!r}: must lie inside guest RAM ({ranges})")
        if to_client:
            # The bytes go to the client, which writes the file where the operator is: a daemon
            # under ProtectSystem=strict and PrivateTmp could not write there.
            memory = vm.memory
            header = {"name": hosted.name, "start": start, "length": length}
            return ByteStream(header, length, lambda offset, size: memory.read_sparse(start + offset, size).tobytes())
        assert isinstance(path, str)
        try:
            await trio.to_thread.run_sync(_write_file, Path(path), vm.memory, start, length)
        except OSError as err:
            raise RequestError(f"cannot write {path}: {err.strerror}") from None
        return {"name": hosted.name, "file": path, "start": start, "length": length}

    def console_log(self, spec: VmSpec) -> Path | None:
        """A raw guest's console log: <state_dir>/console/<name>.log (appended to)."""
        if spec.guest != "raw":
            return None
        return console_log_path(self.config.daemon.state_dir, spec.name)

    async def cmd_vm_console(self, args: CommandArgs) -> CommandReply:
        """A raw guest's UART output: what the buffer (its last 64 KiB) holds after byte `since`
        (0: all of it), and the position to ask from next time (`migratectl vm console -f`)."""
        hosted = self.hosted(args)
        if hosted.ports is None:
            raise RequestError(f"VM {hosted.name} has no console (only raw guests have a UART)")
        since = args.get("since", 0)
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise RequestError(f"since {since!r}: a byte position >= 0")
        data, position = hosted.ports.uart.read_output(since)
        return {
            "name": hosted.name,
            "output": data.decode("latin-1"),  # bytes as code points 0-255: lossless in JSON
            "encoding": "latin-1",
            "next": position,
            "dropped": max(0, position - len(data) - since),
            "log": str(hosted.console_log.path) if hosted.console_log is not None else None,
        }

    async def cmd_events(self, args: CommandArgs) -> CommandReply:
        """The live event stream (`migratectl events`): every log event, optionally one VM's."""
        vm = args.get("vm")
        if vm is not None and not isinstance(vm, str):
            raise RequestError('"vm" must be a string (a VM name)')
        return EventStream(BUS.subscribe(vm))

    async def cmd_daemon_status(self, args: CommandArgs) -> CommandReply:
        return {
            "vms": len(self.vms),
            "lost_vms": len(self.records.lost()),
            "event_subscribers": BUS.subscriptions(),
            "incoming_migrations": len(self.incoming),
            "listen": str(self.config.peer.listen),
            "control_socket": str(self.config.daemon.control_socket),
            "pvm": self.kvm.caps().pvm,
            "harvester_realtime": self.realtime_error is None,
            "harvester_realtime_error": self.realtime_error,
            "vcpu_nice_restorable": self.nice_error is None,
            "downtime_idle_polling": self.cpu_latency_error is None,
            "vm_shell": self.vm_shell.status(),
            "ram_reserve": self.ram_reserve.status(),
        }

    async def remove_vm(self, hosted: HostedVm, reason: str, keep_record: bool = False) -> None:
        if self.vms.get(hosted.name) is hosted and not keep_record:
            self.records.remove(hosted.name)
        self.vms.pop(hosted.name, None)
        await trio.to_thread.run_sync(hosted.close)
        hosted.state = VmState.STOPPED
        self.log.info("vm_removed", vm=hosted.name, reason=reason)
        self.update_status()

    def start_task(self, task: Callable[[], Awaitable[object]]) -> None:
        """Run a background task (a migration, a resolver) in the daemon's root nursery."""
        assert self.nursery is not None
        self.nursery.start_soon(task)

    async def release_migrated(self, hosted: HostedVm) -> None:
        """The target runs the VM: free this copy (its record stays in `migrations`)."""
        self.records.remove(hosted.name)
        self.vms.pop(hosted.name, None)
        await trio.to_thread.run_sync(hosted.close)
        hosted.state = VmState.MIGRATED
        self.log.info("vm_released", vm=hosted.name)
        self.update_status()

    def register_incoming(self, hosted: HostedVm, migration: Migration, record: bool = True) -> None:
        """`record=False`: the caller writes the VM's record (`record_vm`) itself, off the loop."""
        self.vms[hosted.name] = hosted
        self.release_name(hosted.name)
        self.migrations[hosted.name] = migration
        if record:
            self.record_vm(hosted)

    def record_vm(self, hosted: HostedVm) -> None:
        """Keep the on-disk record of a hosted VM's state (what a successor reports if we die).

        A record that cannot be written (state dir full, read-only) must not take the VM or the
        daemon down with it: the VM is fine, only what a successor would learn is not. The
        error event says so now, the one time it can still be said."""
        try:
            self.records.write(
                hosted.name, hosted.state.value, guest=hosted.spec.guest, memory_mib=hosted.spec.memory_mib
            )
        except OSError as err:
            self.log.error(
                "vm_record_failed",
                vm=hosted.name,
                state=hosted.state.value,
                state_dir=str(self.config.daemon.state_dir),
                error=err.strerror or str(err),
            )

    def finish_incoming(self, target: Migration) -> None:
        """An incoming migration's connection ended: keep its stats, not its VM copy's buffers."""
        stats = target.stats
        if stats is not None and self.migrations.get(stats.vm) is target:
            self.migrations[stats.vm] = FinishedMigration(stats)
            self.log.info("incoming_outcome", migration_id=stats.migration_id, state=stats.state)
        finished = [name for name, m in self.migrations.items() if isinstance(m, FinishedMigration)]
        for name in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self.migrations[name]  # oldest first: dicts keep insertion order

    def update_status(self) -> None:
        running = sum(1 for h in self.vms.values() if h.state is VmState.RUNNING)
        text = f"{len(self.vms)} VMs, {running} running, {len(self.migrations)} migrations"
        if self.realtime_error is not None:
            text += "; WARNING: ring harvester not real-time"
        self.notifier.status(text)

    # ---- lifetime -----------------------------------------------------------------------

    IRQ_INTERVAL_S = 0.1

    async def inject_irqs(self) -> None:
        """The small OS's device interrupt: an edge on its IOAPIC pin every 100 ms, counted by the
        guest. Only into VMs that run here: never between a migration's state save and restore."""
        while True:
            await trio.sleep(self.IRQ_INTERVAL_S)
            for hosted in list(self.vms.values()):
                vm = hosted.vm
                if hosted.spec.guest == "smallos" and hosted.state is VmState.RUNNING and vm:
                    try:
                        pulse_irq(vm, hosted.spec.workload_params().irq_pin)
                    except KvmError as err:
                        self.log.warning("irq_injection_failed", vm=hosted.name, error=str(err))

    async def watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s()
        if interval is None:
            return
        while True:
            # WATCHDOG=1 only when the loop runs (we are here) and every vCPU thread of a VM that
            # should run is alive.
            if all(h.error is None for h in self.vms.values() if h.state is VmState.RUNNING):
                self.notifier.watchdog()
            await trio.sleep(interval)

    def reload(self, config_path: Path | None, overrides: dict[str, object]) -> None:
        try:
            new = load_config(config_path, overrides)
        except ConfigError as err:
            self.log.error("config_reload_refused", error=str(err))
            return
        changes = self.config.changes(new)
        for change in changes:
            if change.reloadable:
                self.log.info("config_changed", key=change.key)
            else:
                self.log.warning("config_change_needs_restart", key=change.key)
        self.config = self.config.apply_reload(new)
        self.vm_shell.refill()  # made again (or closed) for what the configuration says now
        self.ram_reserve.trim()  # a lower ram_reserve_mib frees what is kept past it now
        configure_logging(self.config.daemon.log_format, self.config.daemon.log_level)
        # systemd sets up RuntimeDirectory= again (0750, root's group) for every control process,
        # ExecReload's `kill` included, which shuts the operators' group out of the socket's
        # directory: give it back (socket_access.py).
        try:
            restrict_control_socket(self.config.daemon.control_socket, self.config.daemon.control_socket_group)
        except OSError as err:
            self.log.error("control_socket_access_failed", error=str(err))
        # Also when nothing changed: the operator sees that the reload arrived and was read.
        self.log.info("config_reloaded", source=str(config_path), changes=len(changes))

    async def shutdown(self) -> None:
        """SIGTERM: outgoing migrations under way finish first (a VM half-way to its target is
        handed over, or resumed here, rather than cut off mid-flight); then every VM stops with
        the daemon. Those that were the operator's (not incoming copies, whose source keeps the
        VM) keep their record, so the next daemon reports them as stopped with this one."""
        self.notifier.stopping()
        await self._finish_outgoing_migrations()
        for hosted in list(self.vms.values()):
            if hosted.state in (VmState.RUNNING, VmState.PAUSED, VmState.IN_DOUBT, VmState.FAILED):
                self._record_stopped_with_daemon(hosted)
                await self.remove_vm(hosted, "daemon stopping", keep_record=True)
            else:
                migration = self.migrations.get(hosted.name)
                if hosted.state is VmState.INCOMING and isinstance(migration, Target):
                    # Its own discard (the source is told, and keeps the VM): the data streams
                    # stop before the RAM they write goes, and the record being written in a
                    # thread is on disk before it is removed, or it would outlive the copy.
                    migration.abort_for_good("the target's daemon is stopping")
                    with trio.move_on_after(INCOMING_DISCARD_S):
                        await migration.finished.wait()
                    if self.vms.get(hosted.name) is not hosted:
                        continue  # removed by its discard
                await self.remove_vm(hosted, "daemon stopping")

    async def _finish_outgoing_migrations(self) -> None:
        # Bounded by each migration's own timeout_s and downtime guard; systemd's TimeoutStopSec
        # is set above timeout_s for this. An in-doubt one is not waited for: its record says
        # where COMMIT went, and the next daemon reports that.
        outgoing = [m.stats for m in self.migrations.values() if m.stats is not None and m.stats.role == "source"]
        under_way = [stats for stats in outgoing if stats.state in HANDING_OVER]
        if not under_way:
            return
        self.log.info("finishing_migrations_before_stop", vms=[stats.vm for stats in under_way])
        while any(stats.state in HANDING_OVER for stats in under_way):
            await trio.sleep(0.05)
        for stats in under_way:
            self.log.info("migration_finished_before_stop", vm=stats.vm, state=stats.state)

    def _record_stopped_with_daemon(self, hosted: HostedVm) -> None:
        try:
            self.records.write(
                hosted.name,
                hosted.state.value,
                guest=hosted.spec.guest,
                memory_mib=hosted.spec.memory_mib,
                stopped_with_daemon=True,
            )
        except OSError as err:
            self.log.error("vm_record_failed", vm=hosted.name, error=err.strerror or str(err))


def _in_ram(memory: GuestMemory, gpa: int, length: int = 1) -> bool:
    try:
        memory.region_of(gpa, length)
    except ValueError:
        return False
    return True


def _write_file(path: Path, memory: GuestMemory, start: int, length: int) -> None:
    """Guest-physical [start, start + length) into `path`, its holes left as holes: reading them
    through the mapping would allocate them in the RAM file (`GuestMemory.read_sparse`)."""
    data = memory.read(start, length)
    with open(path, "wb") as file:
        file.truncate(length)
        for first, end in memory.data_ranges(start, length):
            file.seek(first)
            file.write(data[first:end].data)  # the mapping itself, no copy


async def run_daemon(
    config: Config,
    config_path: Path | None,
    overrides: dict[str, object],
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    ensure_kick_handler()
    log = get_logger(component="daemon")
    notifier = Notifier.from_environ(on_error=lambda err: log.warning("sd_notify_failed", error=str(err)))
    check_state_dir(config.daemon.state_dir)
    kvm = Kvm.open()
    daemon = Daemon(config, kvm, notifier)
    caps = kvm.caps()
    if faults.ACTIVE:
        log.warning("test_faults_active", faults=sorted(faults.ACTIVE))
    # The VMs a predecessor hosted died with it: say so, each one, before serving anything.
    for lost in daemon.records.recover():
        log.error(
            "vm_lost_at_restart",
            vm=lost.name,
            state=lost.state,
            previous_pid=lost.pid,
            since=lost.since,
            detail=lost.detail,
        )
    if daemon.downtime_models_error is not None:
        log.warning(
            "downtime_models_ignored",
            error=daemon.downtime_models_error,
            effect="the downtime of each peer is predicted from the defaults until learned again",
        )
    elif len(daemon.downtime_models):
        log.info("downtime_models_loaded", peers=daemon.downtime_models.peers())
    log.info(
        "daemon_starting",
        pvm=caps.pvm,
        dirty_ring_max_bytes=caps.dirty_ring_max_bytes,
        with_bitmap=caps.dirty_ring_with_bitmap,
        arch=caps.arch,
    )
    # Before READY: what the first migration would otherwise pay in its setup (warmup.py).
    log.info("daemon_warmed", **warm_up(kvm, config.migration.max_batch_bytes))
    metrics: DaemonMetrics | None = None
    if daemon.realtime_error is not None:
        log.warning("harvester_realtime_unavailable", error=daemon.realtime_error, cost=COST_WITHOUT_REALTIME, fix=FIX)
    if daemon.nice_error is not None and (config.migration.vcpu_nice or config.migration.vcpu_sched_idle_s):
        log.warning("vcpu_nice_unavailable", error=daemon.nice_error, fix=NICE_FIX)
    if daemon.cpu_latency_error is not None and config.migration.downtime_idle_polling:
        log.warning("cpu_latency_unavailable", error=daemon.cpu_latency_error, fix=CPU_LATENCY_FIX)
    try:
        if config.vm.memory_backing == "shmem-huge":
            # Its default backing must be usable before the daemon looks ready (MemoryBackingError
            # stops the start with the reason; the finally unmounts what was mounted).
            daemon.memory_backing(config.vm.memory_backing)
            log.info(
                "memory_backing_ready", directory=str(daemon.ram_directory.path), mounted=daemon.ram_directory.mounted
            )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                daemon.nursery = nursery
                # Before the control socket: a daemon that cannot serve what it was told to never
                # looks ready.
                if config.daemon.metrics_listen is not None:
                    metrics = DaemonMetrics(daemon)
                    metrics.serve(config.daemon.metrics_listen)
                    log.info("metrics_listening", listen=str(config.daemon.metrics_listen))
                # The peer listener and the migration commands too: a client that reached the
                # control socket must find the daemon listening for peers and `migrate` known (a
                # test connected to the peer port right after its first status reply and was
                # refused, under load).
                await start_migration_service(daemon, nursery)
                await nursery.start(
                    partial(serve_control, group=config.daemon.control_socket_group),
                    config.daemon.control_socket,
                    daemon.handle,
                )
                # After the warm-up, before READY: the first incoming VM finds its shell.
                await nursery.start(daemon.vm_shell.serve)
                nursery.start_soon(daemon.watchdog)
                nursery.start_soon(daemon.inject_irqs)
                # What exists now lives as long as the daemon: no collection walks it again, so one
                # that runs (outside a downtime window) walks only the objects made since.
                frozen = freeze_startup_objects()
                notifier.ready()
                daemon.update_status()
                log.info(
                    "daemon_ready",
                    control_socket=str(config.daemon.control_socket),
                    listen=str(config.peer.listen),
                    gc_frozen_objects=frozen,
                )
                task_status.started(daemon)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        notifier.reloading()
                        daemon.reload(config_path, overrides)
                        notifier.ready()
                        continue
                    log.info("daemon_stopping", signal=signal.Signals(signum).name)
                    await daemon.shutdown()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        if metrics is not None:
            metrics.close()
        daemon.ram_directory.unmount()
        daemon.ram_reserve.close()  # every VM is closed: no file comes after this
        kvm.close()
        notifier.close()
        log.info("daemon_stopped")
