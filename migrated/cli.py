"""migratectl: the operator's command line.

`caps` talks to /dev/kvm directly and works without a running daemon; every other command talks
to a daemon through its control socket.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import DEFAULT_CONTROL_SOCKET
from .control import RequestError, request, request_bytes, stream_events
from .helpformat import parser_options
from .kvm.errors import KvmError
from .kvm.system import DEFAULT_DEVICE, HostCaps, Kvm
from .progress import FINAL_STATES, ProgressPrinter, format_summary, progress_parts

_CAPS_LABELS = {
    "device": "device",
    "api_version": "KVM API version",
    "arch": "architecture",
    "pvm": "PVM (kvm_pvm, nested software hypervisor)",
    "dirty_ring_max_bytes": "dirty ring max bytes",
    "dirty_ring_acq_rel": "dirty ring ACQ_REL",
    "dirty_ring_with_bitmap": "dirty ring WITH_BITMAP",
    "manual_dirty_log_protect": "manual dirty-log protect (flags)",
    "max_vcpus": "max vCPUs",
    "recommended_vcpus": "recommended vCPUs",
    "max_vcpu_id": "max vCPU id",
    "memslots": "memslots",
    "immediate_exit": "immediate_exit",
    "xsave2_bytes": "XSAVE2 bytes",
    "vcpu_mmap_bytes": "vCPU mmap bytes",
}


def format_caps(caps: HostCaps) -> str:
    rows = caps.as_dict()
    width = max(len(label) for label in _CAPS_LABELS.values())
    lines = []
    for key, label in _CAPS_LABELS.items():
        value = rows[key]
        if isinstance(value, bool):
            value = "yes" if value else "no"
        lines.append(f"{label:<{width}}  {value}")
    return "\n".join(lines)


def cmd_caps(args: argparse.Namespace) -> int:
    with Kvm.open(args.device) as kvm:
        caps = kvm.caps()
    if args.json:
        print(json.dumps(caps.as_dict(), indent=2))
    else:
        print(format_caps(caps))
    return 0


def _print(args: argparse.Namespace, result: Any, text: str) -> None:
    print(json.dumps(result, indent=2) if args.json else text)


def _call(args: argparse.Namespace, cmd: str, payload: dict[str, Any] | None = None) -> Any:
    return request(Path(args.socket), cmd, payload)


def _rate(value: str) -> float | str:
    if value == "max":
        return "max"
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: MiB/s as a number >= 0, or 'max'") from None
    if rate < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: MiB/s as a number >= 0, or 'max'")
    return rate


def cmd_daemon_status(args: argparse.Namespace) -> int:
    result = _call(args, "daemon.status")
    text = "\n".join(f"{key}: {value}" for key, value in result.items())
    _print(args, result, text)
    return 0


def cmd_vm_create(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {
        "name": args.name,
        "memory_mib": args.memory,
        "vcpus": args.vcpus,
        "guest": args.guest,
        "dirty_rate_mib_s": args.dirty_rate,
        "working_set_mib": args.working_set,
    }
    if args.dirty_tracking:
        payload["dirty_tracking"] = args.dirty_tracking
    if args.memory_backing:
        payload["memory_backing"] = args.memory_backing
    if args.image is not None or args.guest == "raw":
        if args.guest != "raw" or args.image is None:
            print("migratectl: --image goes with --guest raw, and --guest raw needs --image", file=sys.stderr)
            return 2
        # The daemon reads the file: give it a path that does not depend on our directory.
        payload.update(image=str(Path(args.image).resolve()), load_addr=args.load_addr, entry=args.entry)
    result = _call(args, "vm.create", payload)
    for warning in result.get("warnings", []):
        print(f"migratectl: warning: {warning}", file=sys.stderr)
    _print(
        args,
        result,
        f"created {result['name']}: {result['state']}, dirty tracking {result.get('dirty_tracking')}, "
        f"memory backing {result.get('memory_backing')}",
    )
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    if args.lost:
        lost = _call(args, "vm.list", {"lost": True})
        rows = [f"{'NAME':<20} {'WAS':<10} {'DIED WITH PID':>13}  WHAT IT MEANS"]
        rows += [f"{v['name']:<20} {v['state']:<10} {v['pid']:>13}  {v['detail']}" for v in lost]
        _print(args, lost, "\n".join(rows) if lost else "no VM was lost with a previous daemon process")
        return 0
    result = _call(args, "vm.list")
    # Columns as wide as their longest entry: names go up to 64 characters.
    name_width = max([len("NAME"), *(len(v["name"]) for v in result)])
    state_width = max([len("STATE"), *(len(v["state"]) for v in result)])
    memory = [f"{v['memory_mib']} MiB" for v in result]
    memory_width = max([len("MEMORY"), *(len(m) for m in memory)])
    lines = [f"{'NAME':<{name_width}}  {'STATE':<{state_width}}  {'MEMORY':>{memory_width}}  {'VCPUS':>5}  GUEST"]
    lines += [
        f"{v['name']:<{name_width}}  {v['state']:<{state_width}}  {m:>{memory_width}}  {v['vcpus']:>5}  {v['guest']}"
        for v, m in zip(result, memory)
    ]
    _print(args, result, "\n".join(lines))
    return 0


def _format_show(info: dict[str, Any]) -> str:
    lines = [f"name: {info['name']}", f"state: {info['state']}"]
    if info.get("error"):
        lines.append(f"error: {info['error']}")
    spec = info["spec"]
    lines.append(f"memory: {spec['memory_mib']} MiB, vCPUs: {spec['vcpus']}, guest: {spec['guest']}")
    if "dirty_tracking" in info:
        lines.append(f"dirty tracking: {info['dirty_tracking']} (ring-full exits {info['tracker']['ring_full_exits']})")
    if "memory_backing" in info:
        lines.append(f"memory backing: {info['memory_backing']} ({info['memory_allocated_bytes'] >> 20} MiB allocated)")
    raw = info.get("raw")
    if raw:
        where = raw.get("cs:ip") or raw.get("rip")
        lines.append(f"image: {raw['image']} at {raw['load_addr']}, {raw['entry']} entry ({where})")
        lines.append(f"console: {raw['uart']['bytes_transmitted']} bytes sent (`migratectl vm console {info['name']}`)")
    guest = info.get("guest")
    if guest:
        lines.append(f"heartbeat generation: {guest['heartbeat_generation']} {guest['heartbeat']}")
        lines.append(f"pages written: {guest['pages_written']}")
        lines.append(f"verification errors: {guest['verification_errors']}")
        kernel = guest.get("smallos")
        if kernel:
            lines.append(
                f"small OS: ticks {kernel['ticks']}, IPIs {kernel['ipis']}, IRQs "
                f"{kernel['irqs']}, PIT {kernel['pit_ticks']}, register checks "
                f"{kernel['reg_checks']}, errors {kernel['errors'] or 'none'}"
            )
    return "\n".join(lines)


def cmd_vm_console(args: argparse.Namespace) -> int:
    """Print a raw guest's console output; with --follow, keep printing what comes."""
    out = sys.stdout.buffer
    position = 0
    try:
        while True:
            result = _call(args, "vm.console", {"name": args.name, "since": position})
            if result["dropped"] and position:
                out.write(f"\n[migratectl: {result['dropped']} bytes dropped]\n".encode())
            out.write(result["output"].encode("latin-1"))
            out.flush()
            position = result["next"]
            if not args.follow:
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0  # --follow ends with Ctrl-C: that is how it is stopped, not a failure


def cmd_vm_show(args: argparse.Namespace) -> int:
    result = _call(args, "vm.show", {"name": args.name})
    _print(args, result, _format_show(result))
    return 0


def cmd_vm_stop(args: argparse.Namespace) -> int:
    result = _call(args, "vm.stop", {"name": args.name})
    _print(args, result, f"{result['name']}: {result['state']}")
    return 0


def cmd_vm_forget(args: argparse.Namespace) -> int:
    result = _call(args, "vm.forget", {"name": args.name})
    _print(args, result, f"{result['name']}: {result['state']}")
    return 0


def cmd_vm_set(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"name": args.name, "dirty_rate_mib_s": args.dirty_rate}
    if args.vcpu is not None:
        payload["vcpu"] = args.vcpu
    result = _call(args, "vm.set", payload)
    _print(args, result, _format_show(result))
    return 0


def cmd_vm_simple(args: argparse.Namespace) -> int:
    result = _call(args, f"vm.{args.vm_command}", {"name": args.name})
    _print(args, result, _format_show(result))
    return 0


def _address(value: str) -> int:
    try:
        number = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a number (decimal or 0x hex)") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must be >= 0")
    return number


def cmd_vm_dump(args: argparse.Namespace) -> int:
    """The daemon streams the bytes; this process writes the file, where the operator is (a
    daemon under systemd's ProtectSystem/PrivateTmp sees another file system)."""
    payload: dict[str, Any] = {"name": args.name, "stream": True, "start": args.start}
    if args.length is not None:
        payload["length"] = args.length
    target = Path(args.file)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "wb") as out:
            result = request_bytes(Path(args.socket), "vm.dump", payload, out)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    result = {**result, "file": str(target)}
    _print(args, result, f"wrote {result['length']} bytes from {result['start']:#x} to {result['file']}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"name": args.name, "to": args.to}
    for key, value in (
        ("downtime_limit_ms", args.downtime_limit),
        ("max_bandwidth_mib_s", args.max_bandwidth),
        ("timeout_s", args.timeout),
        ("verify", args.verify),
        ("on_no_convergence", args.on_no_convergence),
        ("max_rounds", args.max_rounds),
        ("completion_timeout_per_gib_s", args.completion_timeout_per_gib),
        ("progress_timeout_s", args.progress_timeout),
        ("target_memory_backing", args.target_memory_backing),
        ("streams", args.streams),
    ):
        if value is not None:
            payload[key] = value
    memory_bytes = _memory_bytes(args) if args.wait else None
    result = _call(args, "migrate", payload)
    if not args.wait:
        _print(args, result, f"migration {result['migration_id']} of {args.name} started")
        return 0
    tty = sys.stderr.isatty()
    progress = ProgressPrinter(sys.stderr, tty, _terminal_width() if tty else 0)
    try:
        while True:
            stats = _call(args, "migration.status", {"name": args.name})
            if stats["state"] in FINAL_STATES:
                break
            progress.show(stats, memory_bytes)
            time.sleep(0.2)
    except KeyboardInterrupt:
        progress.end()
        # Only the watching stops: the daemon migrates on its own, and says so where asked.
        print(
            f"migratectl: stopped watching; migration {result['migration_id']} of "
            f"{args.name} goes on. Follow it with `migratectl migration status {args.name}`, "
            f"stop it with `migratectl migration cancel {args.name}`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    progress.end()
    _print(args, stats, format_summary(stats))
    return 0 if stats["state"] in ("completed", "completed-by-operator") else 1


def _memory_bytes(args: argparse.Namespace) -> int | None:
    """The VM's RAM, for the progress line's total and percentage (None: not known)."""
    try:
        return int(_call(args, "vm.show", {"name": args.name})["spec"]["memory_mib"]) << 20
    except (RequestError, KeyError, TypeError, ValueError):
        return None  # the migrate request that follows reports a missing VM properly


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 0


def cmd_migration_status(args: argparse.Namespace) -> int:
    stats = _call(args, "migration.status", {"name": args.name})
    if stats["state"] in FINAL_STATES:
        text = format_summary(stats)
    else:
        moving, clock = progress_parts(stats, None)
        text = f"{moving}  {clock}" if clock else moving
    _print(args, stats, text)
    return 0


def cmd_migration_set(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"name": args.name}
    if args.downtime_limit is not None:
        payload["downtime_limit_ms"] = args.downtime_limit
    if args.max_bandwidth is not None:
        payload["max_bandwidth_mib_s"] = args.max_bandwidth
    stats = _call(args, "migration.set", payload)
    _print(args, stats, f"{args.name}: downtime limit {stats['downtime_limit_ms']:g} ms, in {stats['phase']}")
    return 0


def _format_event(event: dict[str, Any]) -> str:
    stamp = str(event.get("timestamp", ""))[11:23]
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("timestamp", "level", "event"))
    return f"{stamp} {str(event.get('level', '')):<7} {event.get('event')} {fields}".rstrip()


def cmd_events(args: argparse.Namespace) -> int:
    try:
        for event in stream_events(Path(args.socket), {"vm": args.vm} if args.vm else {}):
            print(json.dumps(event, default=str) if args.json else _format_event(event), flush=True)
    except KeyboardInterrupt:
        return 0  # the operator stopped watching: nothing went wrong
    print(f"migratectl: the daemon at {args.socket} closed the event stream", file=sys.stderr)
    return 1


def cmd_migration_cancel(args: argparse.Namespace) -> int:
    result = _call(args, "migration.cancel", {"name": args.name})
    _print(args, result, f"{args.name}: cancelling")
    return 0


def cmd_migration_resolve(args: argparse.Namespace) -> int:
    result = _call(args, "migration.resolve", {"name": args.name, "action": args.action})
    _print(args, result, json.dumps(result))
    return 0


_EPILOG = """\
Every command but `caps` talks to a running migrated through its control socket. Errors go to
stderr as one line naming what failed and why; the exit status is 0 on success, 1 when the
daemon refused or the operation failed, 2 for a bad command line, 130 after Ctrl-C.
"""


def _command(sub: Any, name: str, text: str, description: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=text, description=description or text[0].upper() + text[1:] + ".", **parser_options()
    )
    return parser


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")


def _vm_name(parser: argparse.ArgumentParser, text: str = "the VM's name on this daemon") -> None:
    parser.add_argument("name", help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migratectl", description=__doc__, epilog=_EPILOG, **parser_options())
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--socket", default=str(DEFAULT_CONTROL_SOCKET), help="the daemon's control socket")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    caps = _command(sub, "caps", "what this host's KVM offers (no daemon needed)")
    caps.add_argument("--device", default=DEFAULT_DEVICE, help="the KVM device to ask")
    caps.add_argument("--json", action="store_true", help="print JSON")
    caps.set_defaults(func=cmd_caps)

    daemon = _command(sub, "daemon", "the daemon itself: status").add_subparsers(
        dest="daemon_command", required=True, metavar="DAEMON_COMMAND"
    )
    daemon_status = _command(daemon, "status", "the daemon's VM count, peer address, control socket, PVM")
    _json_flag(daemon_status)
    daemon_status.set_defaults(func=cmd_daemon_status)

    vm_parser = _command(sub, "vm", "VMs on this daemon")
    vm = vm_parser.add_subparsers(dest="vm_command", required=True, metavar="VM_COMMAND")
    create = _command(vm, "create", "create and start a VM")
    _vm_name(create, "a name for the VM, unique on this daemon (it keeps it when migrated)")
    create.add_argument("--memory", type=int, required=True, metavar="MiB", help="guest RAM in MiB (required)")
    create.add_argument("--vcpus", type=int, default=1, help="virtual CPUs, each an OS thread of the daemon")
    create.add_argument(
        "--guest",
        default="workload",
        choices=["workload", "smallos", "raw", "none"],
        help="what runs inside: workload (a page writer that checks its pages), smallos (x86: the "
        "workload under a small kernel with interrupts and timers), raw (your --image), none (empty RAM)",
    )
    create.add_argument(
        "--image",
        metavar="FILE",
        help="raw: a boot sector or flat binary, read by the daemon (required with --guest raw)",
    )
    create.add_argument(
        "--load-addr", type=_address, default=0x7C00, metavar="ADDR", help="raw: guest-physical load address"
    )
    create.add_argument(
        "--entry",
        choices=["real", "long"],
        default="real",
        help="raw: start in real mode at 0:ADDR as a BIOS would, or in 64-bit mode at ADDR with identity paging",
    )
    create.add_argument(
        "--dirty-rate",
        type=_rate,
        default=0.0,
        metavar="MiB/s",
        help="workload: how fast the guest dirties its working set, in MiB/s, or 'max'",
    )
    create.add_argument(
        "--working-set", type=int, default=16, metavar="MiB", help="workload: MiB of RAM the guest writes over"
    )
    create.add_argument(
        "--dirty-tracking",
        choices=["auto", "ring", "bitmap"],
        help="how guest writes are tracked: KVM's per-vCPU dirty rings, the dirty bitmap, or auto "
        "(the ring where offered) (default: the daemon's vm.dirty_tracking)",
    )
    create.add_argument(
        "--memory-backing",
        choices=["memfd", "shmem-huge", "hugetlbfs"],
        help="what holds guest RAM: a memfd (4 KiB pages), a file on a huge-page tmpfs, or reserved "
        "hugetlbfs pages (default: the daemon's vm.memory_backing)",
    )
    create.set_defaults(func=cmd_vm_create)
    for name, func, text in (
        ("list", cmd_vm_list, "list the VMs on this daemon"),
        ("show", cmd_vm_show, "one VM: state, dirty tracking, guest counters"),
        ("stop", cmd_vm_stop, "stop and destroy a VM (its RAM is gone)"),
        ("forget", cmd_vm_forget, "drop the record of a VM lost with a previous daemon process"),
    ):
        command = _command(vm, name, text)
        if name != "list":
            _vm_name(command)
        else:
            command.add_argument(
                "--lost", action="store_true", help="the VMs that died with a previous daemon process instead"
            )
        command.set_defaults(func=func)

    set_rate = _command(vm, "set", "change a running workload guest's dirty rate")
    _vm_name(set_rate)
    set_rate.add_argument("--dirty-rate", type=_rate, required=True, metavar="MiB/s", help="MiB/s, or 'max'")
    set_rate.add_argument(
        "--vcpu",
        type=int,
        default=None,
        metavar="N",
        help="set vCPU N's own rate instead of the whole VM's (0 MiB/s: it follows the VM's rate again); "
        "default: the whole VM",
    )
    set_rate.set_defaults(func=cmd_vm_set)

    for name, text in (("pause", "stop the vCPUs (the VM stays here)"), ("resume", "run a paused VM again")):
        command = _command(vm, name, text)
        _vm_name(command)
        command.set_defaults(func=cmd_vm_simple)
    console = _command(vm, "console", "a raw guest's serial console output (COM1)")
    _vm_name(console)
    console.add_argument("-f", "--follow", action="store_true", help="keep printing new output until Ctrl-C")
    console.set_defaults(func=cmd_vm_console)
    dump = _command(vm, "dump", "guest-physical memory of a paused VM to a file")
    _vm_name(dump)
    dump.add_argument("file", help="where to write it (migratectl writes it, from the bytes the daemon sends)")
    dump.add_argument("--start", type=_address, default=0, metavar="ADDR", help="guest-physical address")
    dump.add_argument(
        "--length",
        type=_address,
        metavar="BYTES",
        help="how many bytes (default: to the end of the RAM region that holds --start)",
    )
    dump.set_defaults(func=cmd_vm_dump)
    # Listed by name so the top-level help can never fall behind the sub-commands.
    vm_help = "VMs on this daemon: " + ", ".join(vm.choices)
    vm_parser.description = vm_help + "."
    _set_choice_help(sub, "vm", vm_help)

    migrate = _command(sub, "migrate", "move a running (or paused) VM to a peer daemon, live")
    _vm_name(migrate)
    migrate.add_argument("--to", required=True, metavar="HOST:PORT", help="the peer daemon's peer.listen address")
    migrate.add_argument(
        "--downtime-limit",
        type=float,
        metavar="MS",
        help="longest pause of the guest, in milliseconds (default: the daemon's migration.downtime_limit_ms)",
    )
    migrate.add_argument(
        "--max-bandwidth",
        type=float,
        metavar="MiB/s",
        help="cap on the migration stream in MiB/s, 0 = unlimited "
        "(default: the daemon's migration.max_bandwidth_mib_s)",
    )
    migrate.add_argument(
        "--streams",
        type=int,
        metavar="N",
        help="data connections that carry the pages, each in its own thread, 1 to 16 "
        "(default: the daemon's migration.streams)",
    )
    migrate.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="seconds the migration may take before the downtime starts; then it is aborted and "
        "the VM runs on here (default: the daemon's migration.timeout_s)",
    )
    migrate.add_argument(
        "--verify",
        choices=["full", "off"],
        help="full: both sides digest the guest's RAM at cutover and abort on a mismatch; off: skip "
        "it (default: the daemon's migration.verify)",
    )
    migrate.add_argument(
        "--on-no-convergence",
        choices=["abort", "force-downtime", "throttle", "dirty-limit"],
        help="what happens when --max-rounds pass over the limit (default: the daemon's migration.on_no_convergence)",
    )
    migrate.add_argument(
        "--max-rounds",
        type=int,
        metavar="N",
        help="dirty rounds before the migration counts as not converging (default: the daemon's migration.max_rounds)",
    )
    migrate.add_argument(
        "--completion-timeout-per-gib",
        type=float,
        metavar="SECONDS",
        help="the whole migration may take at most this per GiB of the VM's RAM, 0 = off "
        "(default: the daemon's migration.completion_timeout_per_gib_s)",
    )
    migrate.add_argument(
        "--progress-timeout",
        type=float,
        metavar="SECONDS",
        help="cancel when no byte reached the target for this long, 0 = off "
        "(default: the daemon's migration.progress_timeout_s)",
    )
    migrate.add_argument(
        "--target-memory-backing",
        choices=["memfd", "shmem-huge", "hugetlbfs"],
        help="what holds the VM's RAM on the target (default: the target daemon's vm.memory_backing)",
    )
    migrate.add_argument(
        "--wait",
        action="store_true",
        help="follow the progress, then print the outcome; exit 0 only if the VM runs on the target. "
        "Ctrl-C stops watching, not the migration",
    )
    migrate.set_defaults(func=cmd_migrate)

    events = _command(sub, "events", "the daemon's events as they happen, as the log has them (Ctrl-C ends it)")
    events.add_argument("--vm", metavar="NAME", help="only this VM's events (default: all)")
    events.add_argument("--json", action="store_true", help="one JSON object per event, as the log has it")
    events.set_defaults(func=cmd_events)

    migration = _command(sub, "migration", "a VM's migration: status, set, cancel, resolve").add_subparsers(
        dest="migration_command", required=True, metavar="MIGRATION_COMMAND"
    )
    status = _command(migration, "status", "progress or outcome of the VM's last migration")
    _vm_name(status)
    status.set_defaults(func=cmd_migration_status)
    cancel = _command(migration, "cancel", "stop a migration before COMMIT; the VM runs on here")
    _vm_name(cancel)
    cancel.set_defaults(func=cmd_migration_cancel)
    adjust = _command(migration, "set", "change a running migration's downtime limit or bandwidth cap")
    _vm_name(adjust)
    adjust.add_argument(
        "--downtime-limit", type=float, metavar="MS", help="the new downtime limit in ms (default: unchanged)"
    )
    adjust.add_argument(
        "--max-bandwidth", type=float, metavar="MiB/s", help="the new cap in MiB/s, 0 = unlimited (default: unchanged)"
    )
    adjust.set_defaults(func=cmd_migration_set)
    resolve = _command(migration, "resolve", "settle an in-doubt migration")
    _vm_name(resolve)
    resolve.add_argument(
        "--action",
        default="ask",
        choices=["ask", "release", "resume"],
        help="ask: ask the target whether it runs the VM; release: the operator knows it runs there "
        "(free this copy); resume: the operator knows it does not (run it here)",
    )
    resolve.set_defaults(func=cmd_migration_resolve)
    for command in (create, status, cancel, resolve, migrate, set_rate, dump, adjust):
        _json_flag(command)
    for command in vm.choices.values():
        if command not in (create, set_rate, dump, console):
            _json_flag(command)
    return parser


def _set_choice_help(sub: Any, name: str, text: str) -> None:
    """Replace the help a sub-command shows in its parent's list (argparse keeps it apart)."""
    for choice in sub._choices_actions:
        if choice.dest == name:
            choice.help = text


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return status
    except (KvmError, RequestError) as err:
        print(f"migratectl: {err}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`vm show x | head -1`): what it did not read is not an error.
        # Point stdout at /dev/null so the interpreter's own flush at exit stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nmigratectl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        print(f"migratectl: {_describe_os_error(err, args)}", file=sys.stderr)
        return EXIT_FAILED


def _describe_os_error(err: OSError, args: argparse.Namespace) -> str:
    """One line naming the object and the cause, never a traceback."""
    cause = err.strerror or (errno.errorcode.get(err.errno, "") if err.errno else "") or str(err)
    if err.filename is not None:
        return f"{err.filename}: {cause}"
    if isinstance(err, TimeoutError) or err.errno is None:
        return f"the daemon at {args.socket} did not answer: {cause or type(err).__name__}"
    return f"talking to the daemon at {args.socket}: {cause}"


if __name__ == "__main__":
    sys.exit(main())
