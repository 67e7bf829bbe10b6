"""What the migration code needs from the daemon that hosts it, and nothing more.

The daemon implements `MigrationHost`; sources, targets and the migration commands see only this
protocol, so the migration package never imports the daemon and the daemon imports it in one
direction (no cycle, no `Any` standing in for a type that cannot be imported).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from ..config import Config
from ..control import ByteStream
from ..events import EventStream
from ..hosted import HostedVm, VmSpec
from ..kvm.backing import RamBacking
from ..kvm.system import Kvm
from .idlelinks import IdleLinks
from ..vmshell import VmShell
from .incoming import Incoming
from .policy import DowntimeModels
from .stats import MigrationStats
from .warmlinks import WarmLinks

# A control command: its arguments as the client sent them (decoded JSON), its answer as JSON.
CommandArgs = dict[str, Any]
CommandReply = dict[str, object] | list[dict[str, object]] | EventStream | ByteStream | None
Command = Callable[[CommandArgs], Awaitable[CommandReply]]


class Migration(Protocol):
    """A migration of one VM, either side, as `migration status` reports it."""

    @property
    def stats(self) -> MigrationStats | None: ...


class IncomingOutcome(Protocol):
    """What became of an incoming migration, kept for a source that asks after a lost link."""

    @property
    def state(self) -> str: ...  # "running", "loaded" or "aborted"

    async def abort_for_good(self, reason: str) -> None: ...


class MigrationHost(Protocol):
    config: Config
    kvm: Kvm
    node: str  # this daemon's name in the peer handshake
    downtime_models: DowntimeModels  # costs learned from this host's past migrations, per peer
    vms: dict[str, HostedVm]
    migrations: dict[str, Migration]  # VM name -> its latest migration
    incoming: Incoming  # incoming migrations in progress, and how recent ones ended
    nice_error: str | None  # None: a migrating guest's vCPU threads may yield (vcpupriority.py)
    idle_links: IdleLinks  # target: peers' idle links held open here
    warm_links: WarmLinks  # source: idle links to peers, for the next migration there
    vm_shell: VmShell  # the empty VM an incoming one may start from
    commands: dict[str, Command]

    def hosted(self, args: CommandArgs) -> HostedVm:
        """The VM that `args["name"]` names, or a RequestError."""
        ...

    def console_log(self, spec: VmSpec) -> Path | None: ...

    def register_incoming(self, hosted: HostedVm, migration: Migration, record: bool = True) -> None: ...

    def record_vm(self, hosted: HostedVm) -> None:
        """Keep the on-disk record of a hosted VM's state (what a successor reports if we die)."""
        ...

    async def release_migrated(self, hosted: HostedVm) -> None:
        """The target runs the VM now: free this copy."""
        ...

    async def remove_vm(self, hosted: HostedVm, reason: str) -> None: ...

    def memory_backing(self, kind: object) -> RamBacking:
        """The RAM backing `kind` names, ready for a new VM; MemoryBackingError otherwise."""
        ...

    def check_overcommit(self, spec: VmSpec) -> list[str]:
        """Warnings for a VM that overcommits the host; OvercommitRefused past the configured factors."""
        ...

    def reserve_name(self, name: str) -> bool:
        """Claim `name` for a VM about to be built; False if a VM or another builder has it."""
        ...

    def release_name(self, name: str) -> None: ...

    def finish_incoming(self, target: Migration) -> None:
        """An incoming migration's connection ended: keep its stats, not its VM copy."""
        ...

    def start_task(self, task: Callable[[], Awaitable[object]]) -> None:
        """Run `task` in the daemon's root nursery (it outlives the request that started it)."""
        ...
