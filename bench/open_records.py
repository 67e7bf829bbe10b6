"""What opening sealed records costs the target, per GiB, in one process and no socket: a reusing
`seal.Opener` (the data streams' kind) takes 1 GiB of 8 MiB records the way a receive thread
does (the length, then the record copied into `receive_buffer()`, then `next_frame()`), buffers
from a warm `RecordBuffers` pool. JSON out.

`--reference-repo DIR` runs the same in another checkout with its own `.venv` (and so its own
cryptography), interleaved round by round: for instance a checkout that opened records in place
under cryptography 50 against this one, which opens them into a second buffer (51 refuses
overlapping buffers).

    python bench/open_records.py [--reference-repo /work/ref] [--rounds 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
MIB = 1 << 20
RECORD = 8 * MIB
RECORDS = 128  # 1 GiB


def child(repo: str, repeat: int) -> dict[str, Any]:
    """Runs in the checkout under test: imports come from `repo`."""
    sys.path.insert(0, repo)
    import cryptography

    from migrated.migration.recordbuffers import RecordBuffers
    from transport import seal

    key = os.urandom(32)
    sealer = seal.Sealer(key)
    frames = [os.urandom(RECORD) for _ in range(2)]
    records = [b"".join(bytes(part) for part in sealer.seal([frame])) for frame in frames * (RECORDS // 2)]
    pool = RecordBuffers()

    def open_all(count: int) -> float:
        opener = seal.Opener(key, RECORD, reuse=True, buffers=pool)  # sequence numbers from 0 again
        started = time.perf_counter()
        for record in records[:count]:
            wire = memoryview(record)
            opener.feed(wire[: seal.LENGTH.size])
            if opener.next_frame() is not None:
                raise RuntimeError("a frame before its record arrived")
            buffer = opener.receive_buffer()
            buffer[:] = wire[seal.LENGTH.size :]
            opener.received(buffer.nbytes)
            if opener.next_frame() is None:
                raise RuntimeError("a whole record did not open")
        elapsed = time.perf_counter() - started
        opener.release()
        return elapsed

    open_all(4)  # the pool's buffers made and touched
    runs = [open_all(RECORDS) * (1 << 30) / (RECORDS * RECORD) for _ in range(repeat)]
    return {"cryptography": cryptography.__version__, "s_per_gib": [round(run, 4) for run in runs]}


def _run(repo: Path, repeat: int) -> dict[str, Any]:
    venv_python = repo / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    out = subprocess.run(
        [python, str(HERE), "--child", str(repo), "--repeat", str(repeat)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-repo", help="another checkout (with its .venv) to compare against")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per checkout")
    parser.add_argument("--repeat", type=int, default=3, help="GiB opened per round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeat)))
        return
    checkouts = {"this": HERE.parents[1]}
    if args.reference_repo:
        checkouts["reference"] = Path(args.reference_repo).resolve()
    results: dict[str, dict[str, Any]] = {name: {"runs": []} for name in checkouts}
    for _ in range(args.rounds):
        for name, repo in checkouts.items():
            run = _run(repo, args.repeat)
            results[name]["cryptography"] = run["cryptography"]
            results[name]["runs"].extend(run["s_per_gib"])
    for result in results.values():
        result["median_s_per_gib"] = statistics.median(result["runs"])
    print(json.dumps({"record_bytes": RECORD, "load_average": os.getloadavg()[0], **results}, indent=1))


if __name__ == "__main__":
    main()
