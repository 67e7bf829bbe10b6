"""Fault injection for tests: named faults switched on by MIGRATED_TEST_FAULTS (comma-separated).

Production never sets the variable; the daemon logs any fault that is active at start-up, so a
misconfigured service shows it loudly. Each name marks one place in the migration where a test
needs a failure that the real world produces only by bad luck:

- target-refuse-loaded: the target aborts instead of answering LOADED.
- target-vanish-after-commit: the target resumes on COMMIT, then drops the link before RUNNING.
- source-lose-commit: the source drops the link instead of sending COMMIT (its record that
  COMMIT may go out was written before the pause).
- source-abort-after-loaded: the source sends ABORT right after LOADED (the target must free
  its loaded copy at once).
- source-vanish-after-loaded: the source drops the link right after LOADED, as a source that
  died would.
- source-stall-rounds: the source sleeps 0.2 s before each dirty round (a slow link, made
  deterministic, so that a test can act during the rounds).
- target-stop-on-done: the target process stops itself (SIGSTOP) when the first DONE arrives, as
  a target host that freezes in the downtime; the test sends SIGCONT. Later migrations run clean.
- source-map-state: the source sends the machine state in its map form whatever the target
  offers, as a source older than the flat-machine-state capability would.
- source-zero-xsave: x86, the source sends every vCPU's XSAVE area zeroed (the negative test of
  the complete state: the guest's register checks must catch it).
- cutover-holds: each side waits HOLD_S at the named points of a migration (source: setup,
  downtime, done, commit; target: loaded, running) and logs `test_fault_hold` with the point
  first, so that a fault matrix sees the point and strikes inside a window it can hit (the real
  windows are a few milliseconds). The guard must then allow for the holds of the downtime.
- target-build-after-streams: the target makes the VM's RAM only once every data stream the source
  announced has connected and waits for it (bounded by the setup deadline), so that a test sees
  streams that connected while the RAM was being made, every time, not by luck of timing.
- target-build-fails: the target's VM build, after ACCEPT and beside the bulk copy, fails as a
  KVM_CREATE_VM refused for lack of memory would, while the data streams write into its RAM.
- source-resume-slow: the source's resume of its VM after a migration that did not cut over
  takes 0.5 s longer (a slow vCPU restart, made deterministic): the outcome must not be
  published before the VM runs again.
- source-record-slow: the source's "migrating" VM record, written beside the setup, takes 0.5 s
  longer (a slow state dir, made deterministic): a migration that fails meanwhile must resume
  and write its own record only after it.
- target-record-slow: the target's VM record, written beside the receive after the build, takes
  0.5 s longer (a slow state dir): LOADED, and a discard's removal of the record, wait for it.
- source-streams-refused: the source connects its data streams to a port where nothing listens
  (the kernel refuses them), while the target makes the RAM: a stream that cannot connect.
- source-warm-link-unwatched: the source's idle warm links are neither watched nor polled before
  use (warmlinks.py), so a link the target closed is handed to the next migration: the close
  that crosses a description in flight, made deterministic (the migration must fall back).
- target-corrupt-ram: the target flips one byte of guest RAM (page 0 of the first slot) once
  every page is in and the state arrived, before its digest: RAM that differs from the source's,
  which verify = full must refuse (the VM keeps running on the source).
- source-skip-its-save: arm64, the source leaves out ITS_SAVE_TABLES and SAVE_PENDING_TABLES
  (the negative test: the target's ITS must then come out wrong, and the test must notice).
"""

from __future__ import annotations

import os

import trio
from structlog.typing import FilteringBoundLogger

KNOWN = frozenset(
    {
        "target-corrupt-ram",
        "target-refuse-loaded",
        "target-vanish-after-commit",
        "source-lose-commit",
        "source-abort-after-loaded",
        "source-vanish-after-loaded",
        "source-stall-rounds",
        "source-skip-its-save",
        "source-zero-xsave",
        "source-map-state",
        "target-stop-on-done",
        "cutover-holds",
        "target-build-after-streams",
        "target-build-fails",
        "source-streams-refused",
        "source-warm-link-unwatched",
        "source-record-slow",
        "source-resume-slow",
        "target-record-slow",
    }
)


def _load() -> frozenset[str]:
    names = frozenset(n.strip() for n in os.environ.get("MIGRATED_TEST_FAULTS", "").split(",") if n.strip())
    unknown = names - KNOWN
    if unknown:
        raise ValueError(f"MIGRATED_TEST_FAULTS names unknown faults {sorted(unknown)}; known: {sorted(KNOWN)}")
    return names


ACTIVE = _load()


def active(name: str) -> bool:
    assert name in KNOWN, name
    return name in ACTIVE


_fired: set[str] = set()


def active_once(name: str) -> bool:
    """True the first time only: a fault that strikes one migration and leaves the next alone."""
    if not active(name) or name in _fired:
        return False
    _fired.add(name)
    return True


# Long enough for a harness that tails the log to see the point and act inside it, short enough
# that three holds in the downtime stay well inside a guard of a few seconds.
HOLD_S = 0.3


async def hold(log: FilteringBoundLogger, point: str) -> None:
    """The cutover-holds fault: announce the point, then wait there (see the module docstring)."""
    if active("cutover-holds"):
        log.info("test_fault_hold", point=point, hold_s=HOLD_S)
        await trio.sleep(HOLD_S)
