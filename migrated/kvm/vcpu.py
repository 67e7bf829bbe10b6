"""One vCPU: its fd, its mmapped kvm_run and dirty ring, and the OS thread that runs KVM_RUN.

The thread runs an explicit loop of three states. RUNNING: in or around KVM_RUN. PAUSED: parked
on a condition variable, outside KVM_RUN (so KVM has flushed the CPU's dirty log into the ring).
FINISHED: the thread has ended, for a stop request or for an error it could not continue from.
Pausing follows DESIGN section 2: set `immediate_exit`, then signal the thread so a KVM_RUN in
progress returns EINTR; the vCPU counts as paused only once its thread reports it has parked.

A throttle holds a vCPU out of KVM_RUN with the same machinery (`hold`/`release`), but apart from
the pause the VMM asked for: a held vCPU is parked, so `pause()` finds it parked at once, and a
release never runs a vCPU that was paused meanwhile.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import uapi
from ._libc import ioctl
from .errors import KvmError, KvmIoctlError, VcpuError
from .threadnames import name_this_thread

# A real-time signal nobody else in the daemon uses; its handler does nothing: its only purpose
# is to make a KVM_RUN in progress return EINTR.
KICK_SIGNAL = signal.SIGRTMIN + 3


def _ignore_kick(signum: int, frame: Any) -> None:
    return None


def ensure_kick_handler() -> None:
    """Install the kick signal's handler (must run on the main thread, once per process)."""
    if signal.getsignal(KICK_SIGNAL) is _ignore_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        raise KvmError("the vCPU kick handler must be installed from the main thread first")
    signal.signal(KICK_SIGNAL, _ignore_kick)
    # Without SA_RESTART semantics the ioctl returns EINTR instead of being restarted.
    signal.siginterrupt(KICK_SIGNAL, True)


class VcpuRunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"


@dataclass(frozen=True)
class VcpuStats:
    index: int
    state: str
    exits: dict[str, int]
    error: str | None


ExitHandler = Callable[["Vcpu"], None]

_EXIT_NAMES = {
    value: name[len("KVM_EXIT_") :].lower()
    for name, value in vars(uapi).items()
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}


class Vcpu:
    """A vCPU of a `Vm`. Created by `Vm`; its thread starts with `start()`."""

    PAUSE_TIMEOUT_S = 5.0
    COMPLETION_EXITS = 64  # bounds complete_pending_io: a string I/O of this many exits at most

    def __init__(self, index: int, fd: int, run_address: int, ring_address: int | None) -> None:
        self.index = index
        self.fd = fd
        self.run_address = run_address
        self.run = uapi.kvm_run.from_address(run_address)
        self.ring_address = ring_address
        self.exits: Counter[str] = Counter()
        self.served_exits = 0  # exits handled without ending the vCPU (hosted.has_run)
        self.error: BaseException | None = None
        # Handlers by exit reason, set by the VM (dirty ring full, port I/O, MMIO).
        self.handlers: dict[int, ExitHandler] = {}
        self._cond = threading.Condition()
        self._want = VcpuRunState.PAUSED
        self._held = False  # held out of KVM_RUN by a throttle, whatever `_want` says
        self._state = VcpuRunState.CREATED
        self._thread: threading.Thread | None = None
        self.on_finished: Callable[[Vcpu], None] | None = None
        # The struct kvm_cpuid2 last set, as set: fixed before the first KVM_RUN (KVM refuses
        # a different one afterwards), so a state save reuses it instead of asking KVM in the
        # downtime. None: never set, or the last set failed (api.rst: the vCPU's CPUID is then
        # undefined).
        self.cpuid_set: bytes | None = None
        # What `top -H` and /proc show for its thread (threadnames.py); the VM names it.
        self.kernel_name = f"vcpu{index}"

    # ---- register access (only while the thread is parked or not started) ----------------

    def ioctl(self, step: str, request: int, arg: Any = 0) -> int:
        """A vCPU ioctl; a failure raises KvmIoctlError naming this vCPU and `step`."""
        try:
            return ioctl(self.fd, request, arg)
        except OSError as err:
            raise KvmIoctlError(f"vCPU {self.index}: {step}", err) from err

    def get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        self.ioctl("KVM_GET_REGS", uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self.ioctl("KVM_SET_REGS", uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        self.ioctl("KVM_GET_SREGS", uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self.ioctl("KVM_SET_SREGS", uapi.KVM_SET_SREGS, sregs)

    def get_mp_state(self) -> int:
        mp = uapi.kvm_mp_state()
        self.ioctl("KVM_GET_MP_STATE", uapi.KVM_GET_MP_STATE, mp)
        return int(mp.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE. x86: with the in-kernel irqchip every vCPU but 0 starts UNINITIALIZED
        (waiting for INIT/SIPI), so a VMM that starts them directly makes them RUNNABLE (HOST-NOTES);
        arm64: RUNNABLE keeps the registers the VMM set, where a PSCI CPU_ON would reset them."""
        self.ioctl("KVM_SET_MP_STATE", uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state(mp_state=mp_state))

    def set_cpuid(self, cpuid_buffer: ctypes.Array[ctypes.c_uint8]) -> None:
        self.cpuid_set = None
        self.ioctl("KVM_SET_CPUID2", uapi.KVM_SET_CPUID2, cpuid_buffer)
        self.cpuid_set = bytes(cpuid_buffer)

    def tsc_khz(self) -> int:
        return self.ioctl("KVM_GET_TSC_KHZ", uapi.KVM_GET_TSC_KHZ)

    # ---- the thread ----------------------------------------------------------------------

    @property
    def state(self) -> VcpuRunState:
        with self._cond:
            return self._state

    @property
    def may_run(self) -> bool:
        """In KVM_RUN, or started or resumed and on its way there (its thread not yet through the
        lock), or held by a throttle that may release it: its registers may change under a
        reader. False once `pause()` returned, and before the first `start()`."""
        with self._cond:
            return self._state is VcpuRunState.RUNNING or self._want is VcpuRunState.RUNNING

    @property
    def thread_id(self) -> int | None:
        """The thread's kernel id (for its scheduling policy); None before it started."""
        thread = self._thread
        return None if thread is None else thread.native_id

    def start(self, running: bool = True) -> None:
        if self._thread is not None:
            raise KvmError(f"vCPU {self.index} already started")
        self._want = VcpuRunState.RUNNING if running else VcpuRunState.PAUSED
        self._thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()
        if not running:
            self.wait_parked()

    def request_pause(self) -> None:
        """Ask the thread to leave KVM_RUN and park; `wait_parked()` waits for it."""
        with self._cond:
            if self._state is VcpuRunState.FINISHED or self._thread is None:
                return
            self._want = VcpuRunState.PAUSED
            self.run.immediate_exit = 1
            ident = self._thread.ident
        _kick(ident)

    def hold(self) -> None:
        """Keep the thread out of KVM_RUN (it parks) until `release()`; does not wait."""
        with self._cond:
            if self._state is VcpuRunState.FINISHED or self._thread is None or self._held:
                return
            self._held = True
            self.run.immediate_exit = 1
            ident = self._thread.ident
        _kick(ident)

    def release(self) -> None:
        """End a hold: the thread runs again if (and only if) it is wanted running."""
        with self._cond:
            if not self._held:
                return
            self._held = False
            self._cond.notify_all()

    def wait_parked(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.PAUSE_TIMEOUT_S if timeout is None else timeout)
        with self._cond:
            while self._thread is not None and self._state not in (
                VcpuRunState.PAUSED,
                VcpuRunState.FINISHED,
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VcpuError(f"vCPU {self.index} did not park within the pause timeout")
                self._cond.wait(remaining)

    def resume(self) -> None:
        with self._cond:
            if self._state is VcpuRunState.FINISHED:
                raise VcpuError(f"vCPU {self.index} has finished and cannot resume: {self.error}")
            self._want = VcpuRunState.RUNNING
            self._cond.notify_all()

    def stop(self) -> None:
        """End the thread (from any state) and wait for it."""
        with self._cond:
            self._want = VcpuRunState.FINISHED
            self.run.immediate_exit = 1
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return
        if thread.is_alive() and thread.ident is not None:
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass
        thread.join()

    def stats(self) -> VcpuStats:
        return VcpuStats(
            index=self.index,
            state=self.state.value,
            exits=dict(self.exits),
            error=None if self.error is None else str(self.error),
        )

    def complete_pending_io(self) -> None:
        """Finish an I/O instruction this parked vCPU exited for, without running any further one.

        api.rst (struct kvm_run): "For KVM_EXIT_IO, KVM_EXIT_MMIO, ... the corresponding operations
        are complete (and guest state is consistent) only after userspace has re-entered the kernel
        with KVM_RUN. ... userspace should ensure that the operation is completed before performing a
        live migration. Userspace can re-enter the guest ... with the immediate_exit field set to
        complete pending operations without allowing any further instructions to be executed."

        The vCPU thread does this itself before it parks (`_loop`); this is the same step for a
        vCPU whose thread was stopped inside an exit handler. Measured on PVM: a pause between an
        `in` exit and the next KVM_RUN leaves rip on the `in` with AL not loaded (re-reading LSR is
        harmless, re-reading RBR loses a byte). With nothing pending, KVM_RUN returns EINTR at once.
        """
        if self.state is VcpuRunState.RUNNING:
            raise VcpuError(f"vCPU {self.index} is running: park it first")
        saved = self.run.immediate_exit
        self.run.immediate_exit = 1
        try:
            # A string instruction may need more than one exit to finish (`rep outsb` of more
            # than a page): each one is served here like the vCPU thread would.
            for _ in range(self.COMPLETION_EXITS):
                try:
                    ioctl(self.fd, uapi.KVM_RUN, 0)
                except OSError as err:
                    if err.errno in (errno.EINTR, errno.EAGAIN):
                        return
                    raise KvmIoctlError(f"vCPU {self.index}: KVM_RUN (completing I/O)", err) from err
                reason = int(self.run.exit_reason)
                handler = self.handlers.get(reason)
                if reason not in (uapi.KVM_EXIT_IO, uapi.KVM_EXIT_MMIO) or handler is None:
                    raise VcpuError(f"vCPU {self.index}: completing I/O, KVM_RUN exited with reason {reason}")
                handler(self)
            raise VcpuError(f"vCPU {self.index}: I/O still incomplete after {self.COMPLETION_EXITS} exits")
        finally:
            self.run.immediate_exit = saved

    def _thread_main(self) -> None:
        name_this_thread(self.kernel_name)
        try:
            self._loop()
        except BaseException as err:  # the thread must report every end, never die silently
            self.error = err
        finally:
            with self._cond:
                self._state = VcpuRunState.FINISHED
                self._cond.notify_all()
            if self.on_finished is not None:
                self.on_finished(self)

    def _loop(self) -> None:
        # api.rst (struct kvm_run): after KVM_EXIT_IO or KVM_EXIT_MMIO "the corresponding
        # operations are complete (and guest state is consistent) only after userspace has
        # re-entered the kernel with KVM_RUN ... userspace should ensure that the operation is
        # completed before performing a live migration", which immediate_exit does "without
        # allowing any further instructions to be executed". So a pause or stop that comes after
        # such an exit first re-enters once (immediate_exit is set by request_pause/stop); only
        # then does the thread park. (Measured on PVM: an `in` stays unretired until then.)
        incomplete = False
        while True:
            with self._cond:
                if incomplete and (self._want is not VcpuRunState.RUNNING or self._held):
                    self.run.immediate_exit = 1
                else:
                    while self._want is VcpuRunState.PAUSED or (self._held and self._want is VcpuRunState.RUNNING):
                        if self._state is not VcpuRunState.PAUSED:
                            self._state = VcpuRunState.PAUSED
                            self._cond.notify_all()
                        self._cond.wait()
                    if self._want is VcpuRunState.FINISHED:
                        return
                    # Cleared here, under the lock, rather than by resume() or release(): the
                    # thread enters KVM_RUN only when neither a pause nor a hold wants it out,
                    # and a request after this point sets it again before it kicks.
                    self.run.immediate_exit = 0
                    self._state = VcpuRunState.RUNNING
            try:
                ioctl(self.fd, uapi.KVM_RUN, 0)
            except OSError as err:
                if err.errno in (errno.EINTR, errno.EAGAIN):
                    self.exits["kick"] += 1
                    incomplete = False
                    continue
                raise KvmIoctlError(f"vCPU {self.index}: KVM_RUN", err) from err
            reason = self.run.exit_reason
            self._handle_exit(reason)
            # A string instruction may exit again while it completes: the loop serves it too.
            incomplete = reason in (uapi.KVM_EXIT_IO, uapi.KVM_EXIT_MMIO)

    def _handle_exit(self, reason: int) -> None:
        self.exits[_EXIT_NAMES.get(reason, str(reason))] += 1
        handler = self.handlers.get(reason)
        if handler is not None:
            handler(self)
        elif reason not in (uapi.KVM_EXIT_INTR, uapi.KVM_EXIT_HLT):
            raise VcpuError(self._describe_fatal_exit(reason))
        # Only now: an exit that ends the vCPU is counted in `exits` before the thread records
        # its error, and a guest whose first exit is fatal must not look as if it ran.
        self.served_exits += 1

    def _describe_fatal_exit(self, reason: int) -> str:
        name = _EXIT_NAMES.get(reason, f"exit reason {reason}")
        detail = ""
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            internal = self.run.exit.internal
            data = [hex(internal.data[i]) for i in range(min(internal.ndata, 16))]
            detail = f" (suberror {internal.suberror}, data {data})"
        elif reason == uapi.KVM_EXIT_FAIL_ENTRY:
            detail = f" (hardware reason {self.run.exit.fail_entry.hardware_entry_failure_reason:#x})"
        elif reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            detail = f" (type {self.run.exit.system_event.type})"
        try:
            rip = f" at rip {self.get_regs().rip:#x}"
        except KvmError:
            rip = ""
        return f"vCPU {self.index} stopped: KVM_EXIT_{name.upper()}{detail}{rip}"


def _kick(ident: int | None) -> None:
    """Signal a vCPU thread out of KVM_RUN (immediate_exit is set: the ioctl returns EINTR)."""
    if ident is None:
        return
    try:
        signal.pthread_kill(ident, KICK_SIGNAL)
    except ProcessLookupError:
        pass  # the thread has just ended; wait_parked sees FINISHED
