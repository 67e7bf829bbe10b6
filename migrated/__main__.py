"""`migrated`: the daemon's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from .config import LOG_LEVELS, ConfigError, builtin_default, load_config
from .control import ControlSocketInUseError
from .helpformat import parser_options
from .kvm.errors import KvmError
from .logs import configure_logging
from .socket_access import ControlSocketGroupError
from .statedir import StateDirError


_DESCRIPTION = """\
The KVM live-migration daemon: it runs VMs (it is their VMM) and moves them, live, to a peer
daemon over TCP. Operators drive it with migratectl over its control socket; systemd runs it
(systemd/migrated.service). SIGHUP re-reads the configuration, SIGTERM stops it, and with it
every VM it runs.
"""

_EPILOG = """\
Exit status: 0 after a clean stop; 1 when it could not start (KVM, a socket, an address in
use); 2 for a bad configuration or command line, which a restart cannot fix.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migrated", description=_DESCRIPTION, epilog=_EPILOG, **parser_options())
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration, e.g. /etc/migrated/migrated.toml (default: the built-in defaults)",
    )
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="where migratectl talks to the daemon; overrides daemon.control_socket "
        f"(default: {builtin_default('daemon.control_socket')})",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"where peers connect to send VMs here; overrides peer.listen (default: {builtin_default('peer.listen')})",
    )
    parser.add_argument(
        "--state-dir",
        metavar="PATH",
        help="what must survive a restart (migration records, console logs); overrides "
        f"daemon.state_dir (default: {builtin_default('daemon.state_dir')})",
    )
    parser.add_argument(
        "--peer-key-file",
        metavar="FILE",
        help="the pre-shared key, 32 to 4096 bytes, mode 0600; overrides peer.key_file (no default)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help=f"least severe log event written; overrides daemon.log_level (default: {builtin_default('daemon.log_level')})",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; overrides daemon.metrics_listen (default: off)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "control_socket": args.control_socket,
        "listen": args.listen,
        "state_dir": args.state_dir,
        "peer_key_file": args.peer_key_file,
        "metrics_listen": args.metrics_listen,
        "log_level": args.log_level,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"migrated: {err}", file=sys.stderr)
        return 2
    configure_logging(config.daemon.log_format, config.daemon.log_level)
    from .daemon import run_daemon
    from .metrics import MetricsError

    try:
        trio.run(run_daemon, config, args.config, overrides)
    except BaseException as err:  # start-up failures arrive wrapped in exception groups
        fatal = _first_leaf(err)
        if isinstance(fatal, ControlSocketGroupError):
            # A configuration that the unit does not match: restarting cannot fix it (exit 2 is
            # the unit's RestartPreventExitStatus).
            print(f"migrated: {fatal}", file=sys.stderr)
            return 2
        if isinstance(fatal, (KvmError, ControlSocketInUseError, StateDirError, OSError, MetricsError)):
            print(f"migrated: {_describe(fatal)}", file=sys.stderr)
            return 1
        raise
    return 0


def _describe(err: BaseException) -> str:
    """One line naming the object: "[Errno 13] Permission denied: '/run/x.sock'" becomes
    "/run/x.sock: Permission denied"."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__


def _first_leaf(err: BaseException) -> BaseException:
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return err


if __name__ == "__main__":
    sys.exit(main())
