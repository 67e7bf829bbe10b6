"""A warm VM shell: one empty VM the daemon keeps ready for its next incoming migration.

After ACCEPT the target builds the VM beside the bulk copy, and competes with it for the cores
(issue 12). Part of that build depends on nothing of the VM it becomes but its `ShellKind`:
KVM_CREATE_VM, the dirty ring (R1), WITH_BITMAP (R2), the in-kernel devices made before the
vCPUs (`Vm.create_empty`). The daemon makes one such shell before READY and again after each
incoming migration that took it; an incoming VM of the shell's kind takes it and its build adds
only the memslots, the vCPUs and the threads (`Vm.complete`). Any other builds from scratch, as
without a shell, and the shell stays.

Rules of this file:

- At most one shell, never shared: `take` hands it out once and forgets it; the VM it became
  closes it with the rest of that VM.
- api.rst (1. General description): "VM ioctls must be issued from the same process (address
  space) that was used to create the VM": the shell is made by the daemon that uses it, on one
  of its own threads.
- Made for the kind the daemon's configuration gives an incoming VM (`vm.dirty_tracking`,
  `vm.ring_bytes`, no in-kernel irqchip: the raw and workload guests), read again at each make,
  so a reload applies to the next shell. `migration.warm_vm_shell = false` closes it.
- Closed when the daemon stops (`serve` ends), and never left half made: a make under way when
  the daemon stops is waited for, then closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from .config import Config
from .kvm.arch import create_empty
from .kvm.errors import KvmError
from .kvm.system import Kvm
from .kvm.vm import ShellKind, Vm, VmConfig, shell_kind
from .logs import get_logger

# What an empty VM is made with: the size only passes `validate_config` (no memslot exists).
SHELL_MEMORY_BYTES = 2 << 20

log = get_logger(component="vm_shell")


def shell_config(config: Config) -> VmConfig:
    """The empty VM an incoming VM of this daemon's defaults starts from."""
    return VmConfig(
        memory_bytes=SHELL_MEMORY_BYTES,
        dirty_tracking=config.vm.dirty_tracking,
        ring_bytes=config.vm.ring_bytes,
        harvest_interval_s=config.vm.harvest_interval_s,
        name="vm-shell",
    )


class VmShell:
    def __init__(self, kvm: Kvm, config: Callable[[], Config]) -> None:
        self._kvm = kvm
        self._config = config  # the daemon's current one (reloadable)
        self._shell: Vm | None = None
        self._wanted = trio.Event()  # set: `serve` makes (or closes) the shell now
        self.made = 0
        self.taken = 0
        self.error: str | None = None  # the last make's failure, until one succeeds

    @property
    def enabled(self) -> bool:
        return self._config().migration.warm_vm_shell

    @property
    def kind(self) -> ShellKind | None:
        return self._shell.kind if self._shell is not None else None

    def take(self, config: VmConfig) -> tuple[Vm | None, str]:
        """On the event loop: the shell, if `config` is of its kind ("used"); otherwise None and
        why: "off" (warm_vm_shell = false), "none" (not made, being made, or taken by another
        migration), "mismatch" (another kind: the shell stays)."""
        if not self.enabled:
            return None, "off"
        shell = self._shell
        if shell is None:
            return None, "none"
        try:
            wanted = shell_kind(config, shell.caps, shell.arch)
        except (KvmError, ValueError):
            return None, "mismatch"  # the build refuses it with the reason
        if wanted != shell.kind:
            return None, "mismatch"
        self._shell = None
        self.taken += 1
        return shell, "used"

    def refill(self) -> None:
        """A migration that may have taken the shell ended: make the next one (off the loop).
        Not at `take`: a make then would compete with that migration's own build and copy."""
        self._wanted.set()

    def status(self) -> dict[str, Any]:
        kind = self.kind
        return {
            "enabled": self.enabled,
            "ready": kind is not None,
            "kind": None if kind is None else str(kind),
            "made": self.made,
            "taken": self.taken,
            "error": self.error,
        }

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The first shell, then `started`; then a new one at each `refill`. Closes the shell
        when cancelled (the daemon stops)."""
        try:
            await self._fill()
            task_status.started()
            while True:
                await self._wanted.wait()
                self._wanted = trio.Event()
                await self._fill()
        finally:
            self.close()

    async def _fill(self) -> None:
        if not self.enabled:
            self.close()
            return
        config = shell_config(self._config())
        current = self._shell
        if current is not None:
            try:
                if current.kind == shell_kind(config, current.caps, current.arch):
                    return
            except (KvmError, ValueError):
                pass  # the configuration no longer makes a valid VM: neither shell nor make
            self.close()  # made for a configuration reloaded since
        # Shielded: a Vm made in the thread must reach `_shell` (closed by `serve`), not be lost.
        with trio.CancelScope(shield=True):
            try:
                shell = await trio.to_thread.run_sync(create_empty, self._kvm, config)
            except (KvmError, ValueError) as err:
                self.error = str(err)
                log.warning("vm_shell_failed", error=self.error, effect="incoming VMs are built from scratch")
                return
        self._shell, self.error = shell, None
        self.made += 1
        log.info("vm_shell_ready", kind=str(shell.kind), made=self.made)

    def close(self) -> None:
        shell, self._shell = self._shell, None
        if shell is not None:
            shell.close()
