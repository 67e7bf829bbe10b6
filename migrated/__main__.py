"""`migrated`: the daemon's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from .config import ConfigError, load_config
from .control import ControlSocketInUseError
from .kvm.errors import KvmError
from .logs import configure_logging
from .socket_access import ControlSocketGroupError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migrated", description="KVM live-migration daemon")
    parser.add_argument("--config", type=Path, help="TOML configuration (default: built-in defaults)")
    parser.add_argument("--control-socket", help="override daemon.control_socket")
    parser.add_argument("--listen", help="override peer.listen (HOST:PORT)")
    parser.add_argument("--state-dir", help="override daemon.state_dir")
    parser.add_argument("--peer-key-file", help="override peer.key_file (the pre-shared key)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "control_socket": args.control_socket,
        "listen": args.listen,
        "state_dir": args.state_dir,
        "peer_key_file": args.peer_key_file,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"migrated: {err}", file=sys.stderr)
        return 2
    configure_logging(config.daemon.log_format, config.daemon.log_level)
    from .daemon import run_daemon

    try:
        trio.run(run_daemon, config, args.config, overrides)
    except BaseException as err:  # start-up failures arrive wrapped in exception groups
        fatal = _first_leaf(err)
        if isinstance(fatal, ControlSocketGroupError):
            # A configuration that the unit does not match: restarting cannot fix it (exit 2 is
            # the unit's RestartPreventExitStatus).
            print(f"migrated: {fatal}", file=sys.stderr)
            return 2
        if isinstance(fatal, (KvmError, ControlSocketInUseError, OSError)):
            print(f"migrated: {fatal}", file=sys.stderr)
            return 1
        raise
    return 0


def _first_leaf(err: BaseException) -> BaseException:
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return err


if __name__ == "__main__":
    sys.exit(main())
