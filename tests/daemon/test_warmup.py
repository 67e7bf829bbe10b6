"""The start-up warm-up (migrated/warmup.py): after it, a migration's setup calls import nothing
more and find the handshake's code paths taken. Each check runs in a fresh interpreter, where
nothing was imported by an earlier test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# The calls a first migration makes on either side that imported modules late before the
# warm-up existed: a VM's RAM (numpy.ctypeslib), the daemon's own dirty pages taken in the
# source's re-arm (np.unique: numpy.ma), a collection, a description and a psk handshake.
_FIRST_MIGRATION_CALLS = """
import json, sys
import migrated.daemon
from migrated.hosted import VmSpec, create_incoming, vm_config
from migrated.kvm.system import Kvm
from migrated.warmup import LAZY_MODULES, _handshake_in_memory, warm_up
from migrated.migration import vmstate

not_loaded = [name for name in LAZY_MODULES if name not in sys.modules]
kvm = Kvm.open()
steps = warm_up(kvm, 8 << 20) if sys.argv[1] == "warm" else {}
before = set(sys.modules)
spec = VmSpec(name="warm", memory_mib=4, guest="none", working_set_mib=1)
hosted = create_incoming(kvm, spec, vm_config(spec, "ring", 1 << 16, 1.0), None, False)
try:
    vm = hosted.vm
    vm.memory.write(vm.memory.regions[0].guest_phys_addr, b"x" * 8192)
    vm.tracker.rearm()
    vm.memory.write(vm.memory.regions[0].guest_phys_addr, b"y" * 8192)
    vm.tracker.collect()
finally:
    hosted.vm.close()
_handshake_in_memory(vmstate.cpu_features(kvm), kvm.caps().arch)
print(json.dumps({"not_loaded_at_start": not_loaded, "steps": steps, "imported_late": sorted(set(sys.modules) - before)}))
"""


def _first_migration_calls(mode: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_MIGRATION_CALLS, mode], cwd=REPO, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


@pytest.mark.kvm
def test_after_the_warm_up_a_first_migrations_calls_import_nothing() -> None:
    cold = _first_migration_calls("cold")
    # Precondition: the daemon's own imports leave some of these to the first call (a module
    # may import one up front, as kvm/dirty.py does numpy.ma), and without the warm-up that call
    # imports each of them (else this test could not fail).
    left = cold["not_loaded_at_start"]
    assert isinstance(left, list) and left, cold
    assert set(left) <= set(cold["imported_late"]), cold
    warm = _first_migration_calls("warm")
    assert warm["imported_late"] == [], warm
    assert set(warm["steps"]) == {
        "imports_ms",
        "cpu_features_ms",
        "handshake_ms",
        "record_buffers_ms",
        "stream_threads_ms",
    }, warm


def test_the_warm_up_handshake_fails_loudly_on_a_broken_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transport that no longer completes the dry run is a bug to see at start-up, named, not
    a daemon that starts half-warm."""
    from transport import Connection

    from migrated import warmup

    monkeypatch.setattr(Connection, "next_event", lambda self: None)
    with pytest.raises(RuntimeError, match="warm-up handshake: sent Hello"):
        warmup._handshake_in_memory({}, "x86_64")
