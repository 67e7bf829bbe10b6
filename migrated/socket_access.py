"""Who may use the control socket: root alone (0600), or also one group (0660).

The unit gives the daemon no capability, so chown(2) can hand a file only to a group the daemon
is a member of (`SupplementaryGroups=` in the unit); anything else fails with EPERM, and the
error says what to add. When the socket lies in the directory systemd made for the unit
(`RuntimeDirectory=`, announced in $RUNTIME_DIRECTORY), that directory is the first gate (0750,
root's group): it gets the operators' group too, or they could not reach the socket in it. A
directory the operator chose is left as it is.
"""

from __future__ import annotations

import grp
import os
from collections.abc import Mapping
from pathlib import Path

SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660
GROUP_DIRECTORY_MODE = 0o750


class ControlSocketGroupError(PermissionError):
    """The socket (or its directory) cannot be given to the configured group."""


def restrict_control_socket(path: Path, group: str | None, environ: Mapping[str, str] | None = None) -> None:
    """Set the socket's mode and group, and its runtime directory's, as `group` asks."""
    if group is None:
        os.chmod(path, SOCKET_MODE)
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:  # checked at load, but the group database may have changed since
        raise ControlSocketGroupError(
            f"daemon.control_socket_group: there is no group {group!r} on this host (control socket {path})"
        ) from None
    _give(path, gid, group, GROUP_SOCKET_MODE)
    runtime_dirs = (os.environ if environ is None else environ).get("RUNTIME_DIRECTORY", "")
    if str(path.parent) in runtime_dirs.split(":"):
        _give(path.parent, gid, group, GROUP_DIRECTORY_MODE)


def _give(path: Path, gid: int, group: str, mode: int) -> None:
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        raise ControlSocketGroupError(
            f"daemon.control_socket_group: cannot give {path} to group {group!r}: the daemon is not a "
            f"member of it and holds no CAP_CHOWN; add SupplementaryGroups={group} to the unit"
        ) from None
    os.chmod(path, mode)
