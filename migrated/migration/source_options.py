"""What the operator asked of one outgoing migration (`migrate` and `migration set`): the source's
options, apart from source.py so that its parts (outgoing_setup.py) can name them without an
import cycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SourceOptions:
    host: str
    port: int
    downtime_limit_ms: float
    max_bandwidth_mib_s: float
    timeout_s: float
    max_rounds: int
    on_no_convergence: str
    verify: Literal["full", "off"]
    max_batch_bytes: int
    downtime_guard_ms: float = 2000.0
    completion_timeout_per_gib_s: float = 0.0  # 0: off (KubeVirt's completionTimeoutPerGiB)
    progress_timeout_s: float = 0.0  # 0: off; no byte moved for this long cancels (before the downtime)
    target_memory_backing: str | None = None  # None: the target daemon's vm.memory_backing
    streams: int = 2  # data connections carrying the pages (sendstreams.py)
