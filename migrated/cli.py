"""migratectl: the operator's command line.

`caps` talks to /dev/kvm directly and works without a running daemon; every other command talks
to a daemon through its control socket.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import DEFAULT_CONTROL_SOCKET
from .control import RequestError, request, stream_events
from .kvm.errors import KvmError
from .kvm.system import DEFAULT_DEVICE, HostCaps, Kvm

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
    if args.image is not None or args.guest == "raw":
        if args.guest != "raw" or args.image is None:
            print("migratectl: --image goes with --guest raw, and --guest raw needs --image", file=sys.stderr)
            return 2
        # The daemon reads the file: give it a path that does not depend on our directory.
        payload.update(image=str(Path(args.image).resolve()), load_addr=args.load_addr, entry=args.entry)
    result = _call(args, "vm.create", payload)
    _print(args, result, f"created {result['name']}: {result['state']}, dirty tracking {result.get('dirty_tracking')}")
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    if getattr(args, "lost", False):
        lost = _call(args, "vm.list", {"lost": True})
        rows = [f"{'NAME':<20} {'WAS':<10} {'DIED WITH PID':>13}  WHAT IT MEANS"]
        rows += [f"{v['name']:<20} {v['state']:<10} {v['pid']:>13}  {v['detail']}" for v in lost]
        _print(args, lost, "\n".join(rows) if lost else "no VM was lost with a previous daemon process")
        return 0
    result = _call(args, "vm.list")
    lines = [f"{'NAME':<20} {'STATE':<10} {'MEMORY':>8} {'VCPUS':>5}  GUEST"]
    lines += [f"{v['name']:<20} {v['state']:<10} {v['memory_mib']:>6}Mi {v['vcpus']:>5}  {v['guest']}" for v in result]
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
    while True:
        result = _call(args, "vm.console", {"name": args.name, "since": position})
        if result["dropped"] and position:
            out.write(f"\n[migratectl: {result['dropped']} bytes dropped]\n".encode())
        out.write(result["output"].encode("latin-1"))
        out.flush()
        position = result["next"]
        if not args.follow:
            return 0
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:
            return 0


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
    result = _call(args, "vm.set", {"name": args.name, "dirty_rate_mib_s": args.dirty_rate})
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
    payload: dict[str, Any] = {"name": args.name, "file": str(Path(args.file).resolve()), "start": args.start}
    if args.length is not None:
        payload["length"] = args.length
    result = _call(args, "vm.dump", payload)
    _print(args, result, f"wrote {result['length']} bytes from {result['start']:#x} to {result['file']}")
    return 0


def _progress_line(s: dict[str, Any]) -> str:
    predicted = s.get("predicted_downtime_ms")
    return (
        f"{s['state']:<9} round {s['round']:>3}  sent {s['bytes_sent'] / 2**20:9.1f} MiB  "
        f"remaining {s['pages_remaining']:>8} pages  dirty {s['dirty_rate_mib_s']:7.1f} MiB/s  "
        f"bw {s['bandwidth_mib_s']:7.1f} MiB/s  predicted downtime "
        f"{'-' if predicted is None else f'{predicted:.1f} ms'}"
    )


FINAL_STATES = ("completed", "completed-by-operator", "failed", "aborted", "cancelled", "in-doubt")


def _format_final(s: dict[str, Any]) -> str:
    keys = [
        "state",
        "total_ms",
        "setup_ms",
        "downtime_ms",
        "predicted_downtime_ms",
        "verify_ms",
        "bytes_sent",
        "pages_sent",
        "zero_pages",
        "rounds",
        "bandwidth_mib_s",
        "dirty_rate_mib_s",
        "dirty_tracking",
        "backup_bitmap",
        "error",
    ]
    lines = [f"{k}: {s.get(k)}" for k in keys if s.get(k) is not None]
    if s.get("downtime_limit_exceeded"):
        lines.append(
            f"warning: the downtime {s.get('downtime_ms', 0):.1f} ms exceeded the limit {s.get('downtime_limit_ms')} ms"
        )
    return "\n".join(lines)


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
    ):
        if value is not None:
            payload[key] = value
    result = _call(args, "migrate", payload)
    if not args.wait:
        _print(args, result, f"migration {result['migration_id']} of {args.name} started")
        return 0
    tty = sys.stderr.isatty()
    while True:
        stats = _call(args, "migration.status", {"name": args.name})
        if stats["state"] in FINAL_STATES:
            break
        print(_progress_line(stats), end="\r" if tty else "\n", file=sys.stderr, flush=True)
        time.sleep(0.2)
    if tty:
        print(file=sys.stderr)
    _print(args, stats, _format_final(stats))
    return 0 if stats["state"] in ("completed", "completed-by-operator") else 1


def cmd_migration_status(args: argparse.Namespace) -> int:
    stats = _call(args, "migration.status", {"name": args.name})
    _print(args, stats, _format_final(stats) if stats["state"] in FINAL_STATES else _progress_line(stats))
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


def cmd_migration_cancel(args: argparse.Namespace) -> int:
    result = _call(args, "migration.cancel", {"name": args.name})
    _print(args, result, f"{args.name}: cancelling")
    return 0


def cmd_migration_resolve(args: argparse.Namespace) -> int:
    result = _call(args, "migration.resolve", {"name": args.name, "action": args.action})
    _print(args, result, json.dumps(result))
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
    print(f"the daemon at {args.socket} closed the event stream", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migratectl", description=__doc__)
    parser.add_argument(
        "--socket", default=str(DEFAULT_CONTROL_SOCKET), help="the daemon's control socket (default %(default)s)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    caps = sub.add_parser("caps", help="what this host's KVM offers (no daemon needed)")
    caps.add_argument("--device", default=DEFAULT_DEVICE, help="KVM device (default %(default)s)")
    caps.add_argument("--json", action="store_true", help="print JSON")
    caps.set_defaults(func=cmd_caps)

    events = sub.add_parser("events", help="the daemon's events as they happen (Ctrl-C ends it)")
    events.add_argument("--vm", metavar="NAME", help="only this VM's events")
    events.add_argument("--json", action="store_true", help="one JSON object per event, as the log has it")
    events.set_defaults(func=cmd_events)

    vm = sub.add_parser("vm", help="create, list, show, stop VMs").add_subparsers(
        dest="vm_command", required=True, metavar="VM_COMMAND"
    )
    create = vm.add_parser("create", help="create and start a VM")
    create.add_argument("name")
    create.add_argument("--memory", type=int, required=True, help="guest RAM in MiB")
    create.add_argument("--vcpus", type=int, default=1)
    create.add_argument("--guest", default="workload", choices=["workload", "smallos", "raw", "none"])
    create.add_argument("--image", help="raw: a boot sector or flat binary (read by the daemon)")
    create.add_argument(
        "--load-addr", type=_address, default=0x7C00, help="raw: guest-physical load address (default 0x7c00)"
    )
    create.add_argument(
        "--entry",
        choices=["real", "long"],
        default="real",
        help="raw: start in real mode at 0:ADDR as a BIOS would (default), or in "
        "64-bit mode at ADDR with identity paging",
    )
    create.add_argument("--dirty-rate", type=_rate, default=0.0, help="MiB/s the guest dirties, or 'max'")
    create.add_argument("--working-set", type=int, default=16, help="MiB the guest writes over")
    create.add_argument("--dirty-tracking", choices=["auto", "ring", "bitmap"])
    create.set_defaults(func=cmd_vm_create)
    for name, func, text in (
        ("list", cmd_vm_list, "list VMs"),
        ("show", cmd_vm_show, "one VM"),
        ("stop", cmd_vm_stop, "stop and destroy a VM"),
        ("forget", cmd_vm_forget, "drop the record of a VM lost with a previous daemon process"),
    ):
        command = vm.add_parser(name, help=text)
        if name != "list":
            command.add_argument("name")
        else:
            command.add_argument("--lost", action="store_true", help="the VMs that died with a previous daemon process")
        command.set_defaults(func=func)

    set_rate = vm.add_parser("set", help="change a running workload guest's dirty rate")
    set_rate.add_argument("name")
    set_rate.add_argument("--dirty-rate", type=_rate, required=True, help="MiB/s, or 'max'")
    set_rate.add_argument("--json", action="store_true", help="print JSON")
    set_rate.set_defaults(func=cmd_vm_set)

    for name, text in (("pause", "stop the vCPUs (the VM stays here)"), ("resume", "run it again")):
        command = vm.add_parser(name, help=text)
        command.add_argument("name")
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(func=cmd_vm_simple)
    console = vm.add_parser("console", help="a raw guest's serial console output (COM1)")
    console.add_argument("name")
    console.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    console.set_defaults(func=cmd_vm_console)
    dump = vm.add_parser("dump", help="guest-physical memory of a paused VM to a file")
    dump.add_argument("name")
    dump.add_argument("file")
    dump.add_argument("--start", type=_address, default=0, help="guest-physical address")
    dump.add_argument("--length", type=_address, help="bytes (default: to the end of that RAM region)")
    dump.add_argument("--json", action="store_true", help="print JSON")
    dump.set_defaults(func=cmd_vm_dump)

    migrate = sub.add_parser("migrate", help="move a running VM to a peer daemon")
    migrate.add_argument("name")
    migrate.add_argument("--to", required=True, help="the peer daemon, HOST:PORT")
    migrate.add_argument("--downtime-limit", type=float, help="ms")
    migrate.add_argument("--max-bandwidth", type=float, help="MiB/s (0 = unlimited)")
    migrate.add_argument("--timeout", type=float, help="s")
    migrate.add_argument("--verify", choices=["full", "off"])
    migrate.add_argument(
        "--on-no-convergence",
        choices=["abort", "force-downtime", "throttle"],
        help="when max rounds pass over the limit (default: the daemon's migration.on_no_convergence)",
    )
    migrate.add_argument("--max-rounds", type=int, help="dirty rounds before that (default: migration.max_rounds)")
    migrate.add_argument(
        "--completion-timeout-per-gib",
        type=float,
        metavar="S",
        help="at most S seconds per GiB of RAM for the whole migration (0 = off)",
    )
    migrate.add_argument(
        "--progress-timeout", type=float, metavar="S", help="cancel when no byte reached the target for S seconds"
    )
    migrate.add_argument(
        "--wait", action="store_true", help="follow progress; exit 0 only if the VM runs on the target"
    )
    migrate.set_defaults(func=cmd_migrate)

    migration = sub.add_parser("migration", help="status, cancel, resolve").add_subparsers(
        dest="migration_command", required=True, metavar="MIGRATION_COMMAND"
    )
    status = migration.add_parser("status", help="progress or outcome of the VM's last migration")
    status.add_argument("name")
    status.set_defaults(func=cmd_migration_status)
    cancel = migration.add_parser("cancel", help="stop a migration before COMMIT; the VM runs here")
    cancel.add_argument("name")
    cancel.set_defaults(func=cmd_migration_cancel)
    adjust = migration.add_parser("set", help="change a running migration's downtime limit or bandwidth cap")
    adjust.add_argument("name")
    adjust.add_argument("--downtime-limit", type=float, metavar="MS", help="the new downtime limit, ms")
    adjust.add_argument("--max-bandwidth", type=float, metavar="MIB_S", help="the new cap, MiB/s (0 = unlimited)")
    adjust.add_argument("--json", action="store_true", help="print JSON")
    adjust.set_defaults(func=cmd_migration_set)
    resolve = migration.add_parser("resolve", help="settle an in-doubt migration")
    resolve.add_argument("name")
    resolve.add_argument(
        "--action",
        default="ask",
        choices=["ask", "release", "resume"],
        help="ask the target (default); or release / resume by operator decision",
    )
    resolve.set_defaults(func=cmd_migration_resolve)
    for command in (create, status, cancel, resolve, migrate):
        command.add_argument("--json", action="store_true", help="print JSON")
    for command in vm.choices.values():
        if command not in (create, set_rate, dump, console) and command.get_default("func") is not cmd_vm_simple:
            command.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (KvmError, RequestError) as err:
        print(f"migratectl: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
