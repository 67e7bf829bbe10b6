"""migratectl: the operator's command line.

`caps` talks to /dev/kvm directly and works without a running daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migratectl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    caps = sub.add_parser("caps", help="what this host's KVM offers (no daemon needed)")
    caps.add_argument("--device", default=DEFAULT_DEVICE, help="KVM device (default %(default)s)")
    caps.add_argument("--json", action="store_true", help="print JSON")
    caps.set_defaults(func=cmd_caps)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KvmError as err:
        print(f"migratectl: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
