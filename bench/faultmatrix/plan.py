"""The seeded choices of a run: which fault, at which phase, how long, how far into the window.

Every (phase, kind) pair of the full matrix appears once in len(PHASES) rounds of one fault per
kind, in an order shuffled by the seed; a run of N faults takes the first N. The same seed gives the same plan, whatever happens at run time.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from .cluster import GUARD_S, IO_TIMEOUT_S, MAX_ROUNDS

# The source's status and the hold points (migrated/faults.py, cutover-holds) mark each phase.
PHASES = (
    "setup",
    "bulk",
    *(f"round-{n}" for n in range(1, MAX_ROUNDS + 1)),
    "downtime",
    "done",
    "loaded",
    "commit",
    "running",
)

KINDS = (
    "link-down-short",  # shorter than the peer I/O timeout
    "link-down-long",  # longer than the peer I/O timeout and the guard
    "link-slow",  # tc tbf 10 mbit
    "kill-target",
    "kill-source",
    "stop-target-short-io",
    "stop-target-long-io",
    "stop-target-long-guard",
    "stop-source-short-io",
    "stop-source-long-io",
    "stop-source-long-guard",
    "term-source",
    "full-source-state-dir",
    "full-target-state-dir",
)

# The timeouts a stop is measured against, and what "short" and "long" mean for each.
TIMEOUTS_S = {"io": IO_TIMEOUT_S, "guard": GUARD_S}
LONG_MARGIN_S = 1.0


def duration_for(kind: str) -> float:
    """How long a fault lasts before it is healed (0: it is not healed, the process is gone)."""
    if kind == "link-down-short":
        return IO_TIMEOUT_S / 4
    if kind == "link-down-long":
        return max(TIMEOUTS_S.values()) + LONG_MARGIN_S
    if kind == "link-slow":
        return 3.0
    if kind.startswith("stop-"):
        timeout = TIMEOUTS_S[kind.rsplit("-", 1)[1]]
        return timeout / 4 if "-short-" in kind else timeout + LONG_MARGIN_S
    if kind.startswith("full-"):
        return 3.0
    return 0.0


@dataclass(frozen=True)
class Fault:
    index: int
    phase: str
    kind: str
    delay_s: float  # how far into the phase's window the fault strikes
    duration_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_s(phase: str) -> float:
    """How much of a phase's window a fault may wait before striking, so it stays inside it."""
    if phase == "bulk":
        return 0.3
    if phase.startswith("round-"):
        return 0.15
    return 0.2  # the hold points last faults.HOLD_S = 0.3 s


def make_plan(seed: int, count: int) -> list[Fault]:
    """Rounds of one fault per kind, each kind at a different phase in each round (a Latin
    square over the seed's order of kinds and phases): the first round already has every kind,
    a short run spreads over the phases, and len(PHASES) rounds are the whole matrix."""
    rng = random.Random(seed)
    kinds, phases = list(KINDS), list(PHASES)
    rng.shuffle(kinds)
    rng.shuffle(phases)
    pairs: list[tuple[str, str]] = []
    turn = 0
    while len(pairs) < count:
        rounds = [(phases[(i + turn) % len(phases)], kind) for i, kind in enumerate(kinds)]
        rng.shuffle(rounds)
        pairs += rounds
        turn += 1
    return [
        Fault(i, phase, kind, round(rng.uniform(0.0, window_s(phase)), 3), duration_for(kind))
        for i, (phase, kind) in enumerate(pairs[:count])
    ]
