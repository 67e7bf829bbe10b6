"""What every harness here does around its test: the seeds first, then libFuzzer."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris


def fuzz_from_seeds(
    argv: list[str],
    seeds: Iterable[bytes],
    test_one_input: Callable[[bytes], None],
    name: str,
    check_seeds: bool = True,
) -> None:
    """libFuzzer with `argv` (its -runs=N, -seed=N, ... and corpus directories); with no corpus
    directory given, from a temporary one holding `seeds` rather than from nothing. With
    `check_seeds`, every seed goes through `test_one_input` first: a smoke test that fails before
    any fuzzing."""
    args = list(argv)
    seeds = list(seeds)
    if check_seeds:
        for seed in seeds:
            test_one_input(seed)
    if not any(not arg.startswith("-") for arg in args[1:]):
        corpus = Path(tempfile.mkdtemp(prefix=f"{name}."))
        for number, seed in enumerate(seeds):
            (corpus / f"seed{number}").write_bytes(seed)
        args.append(str(corpus))
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
