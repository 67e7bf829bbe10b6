"""The migration code's long timers, on trio's MockClock: minutes of waiting tested in
milliseconds, without sleeping. Real parts: a real Daemon object (the MigrationHost), real KVM
VMs, real sockets and the real peer handshake; only time is virtual.

- A target whose source falls silent cuts it off after peer.message_timeout_s, not a virtual
  second before, and discards the copy it was loading.
- A source whose migration is in doubt keeps asking the target, every `interval_s`, while the
  target cannot be reached, never resuming on its own; once the target answers, it acts on it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing
from helpers import write_key

from migrated.config import load_config
from migrated.daemon import Daemon
from migrated.hosted import VmSpec, VmState, create_incoming, create_local, vm_config
from migrated.kvm.system import Kvm
from migrated.migration.service import serve_peers
from migrated.migration.source import Source, SourceOptions, new_migration_id
from migrated.migration.stats import MigrationStats
from migrated.migration.target import Target
from migrated.peer import PeerError
from migrated.sdnotify import Notifier

pytestmark = pytest.mark.kvm

# With autojump the virtual clock also runs while work happens in threads (creating, closing or
# resuming a VM): waits for such work are bounded in virtual time this generously.
VIRTUAL_BOUND_S = 1e6


def _daemon(tmp_path: Path, name: str, key: Path, port: int) -> Daemon:
    config = load_config(
        None,
        {
            "control_socket": tmp_path / f"{name}.sock",
            "state_dir": tmp_path / f"{name}-state",
            "listen": f"127.0.0.1:{port}",
            "peer_key_file": key,
        },
    )
    return Daemon(config, Kvm.open(), Notifier.from_environ({}))


def _spec(name: str) -> VmSpec:
    return VmSpec(name=name, memory_mib=32, working_set_mib=4)  # the workload guest, small


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_target_drops_a_silent_source_after_the_message_timeout(tmp_path: Path) -> None:
    """A source that falls silent mid-migration: the target cuts it off when the link has been
    silent for peer.connect_timeout_s (10 s; a peer that trickles bytes meets the per-message
    deadline, peer.message_timeout_s, instead), not a virtual second before; the copy it was
    loading is discarded at once (it never runs without COMMIT) and "aborted" is its outcome."""
    daemon = _daemon(tmp_path, "target", write_key(tmp_path / "peer.key"), _free_port())
    timeout = min(daemon.config.peer.connect_timeout_s, daemon.config.peer.message_timeout_s)
    spec = _spec("incoming")
    config = vm_config(spec, "auto", daemon.config.vm.ring_bytes, daemon.config.vm.harvest_interval_ms)
    hosted = create_incoming(daemon.kvm, spec, config)
    ours, theirs = socket.socketpair()
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            daemon.nursery = nursery
            target = Target(daemon, trio.SocketStream(trio.socket.from_stdlib_socket(ours)), "test-peer")
            target.hosted = hosted
            target.stats = MigrationStats(migration_id="m-test", vm=spec.name, role="target", peer="test-peer")
            assert daemon.reserve_name(spec.name)
            daemon.register_incoming(hosted, target)
            target.loaded = True
            start = trio.current_time()
            with trio.move_on_after(timeout - 1):
                await target._next()
            assert trio.current_time() - start == timeout - 1, "cut off before the deadline"
            with pytest.raises(PeerError):
                await target._next()
            assert trio.current_time() - start >= 2 * timeout - 1
            await target._on_failure("no complete message from the peer")  # as run() does
            with trio.fail_after(VIRTUAL_BOUND_S):
                while hosted.state is not VmState.STOPPED:  # closed and removed
                    await trio.sleep(0.5)
            assert spec.name not in daemon.vms
            assert daemon.incoming.outcome("m-test") == "aborted"

    try:
        trio.run(main, clock=clock)
    finally:
        theirs.close()
        hosted.close()
        daemon.kvm.close()


def test_source_in_doubt_keeps_asking_until_the_target_answers(tmp_path: Path) -> None:
    key = write_key(tmp_path / "peer.key")
    target_port = _free_port()
    source_daemon = _daemon(tmp_path, "source", key, _free_port())
    target_daemon = _daemon(tmp_path, "target", key, target_port)
    spec = _spec("doubtful")
    config = vm_config(spec, "auto", source_daemon.config.vm.ring_bytes, source_daemon.config.vm.harvest_interval_ms)
    hosted = create_local(source_daemon.kvm, spec, config)
    interval_s = 2.0
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            source_daemon.nursery = nursery
            source_daemon.vms[spec.name] = hosted
            await trio.to_thread.run_sync(hosted.vm.pause)  # type: ignore[union-attr]
            hosted.state = VmState.IN_DOUBT
            defaults = source_daemon.config.migration
            options = SourceOptions(
                host="127.0.0.1",
                port=target_port,
                downtime_limit_ms=defaults.downtime_limit_ms,
                max_bandwidth_mib_s=defaults.max_bandwidth_mib_s,
                timeout_s=defaults.timeout_s,
                max_rounds=defaults.max_rounds,
                on_no_convergence=defaults.on_no_convergence,
                verify=defaults.verify,
                max_batch_bytes=defaults.max_batch_bytes,
            )
            source = Source(source_daemon, hosted, options, new_migration_id())
            # Where _downtime and _fail leave a source whose COMMIT went out and whose RUNNING
            # never came (DESIGN 5): VM paused here at the start of the downtime, in doubt.
            source._paused_at = time.monotonic()
            source.committed = True
            source.stats.state = "in-doubt"
            answers: list[str] = []

            async def resolve() -> None:
                answers.append(await source.resolve(attempts=0, interval_s=interval_s))

            with structlog.testing.capture_logs() as events:
                start = trio.current_time()
                nursery.start_soon(resolve)
                await trio.sleep(10 * interval_s + interval_s / 2)
                failed = [e for e in events if e["event"] == "in_doubt_query_failed"]
                # Nobody listens on the target's port: every try fails, one per interval.
                assert len(failed) >= 10, failed
                assert [e["attempt"] for e in failed] == list(range(1, len(failed) + 1))
                assert not answers
                assert hosted.state is VmState.IN_DOUBT, "resumed without the target's word"
                assert not hosted.vm.running  # type: ignore[union-attr]

                # The target comes back; it never heard of this migration: "unknown".
                target_daemon.nursery = nursery
                await nursery.start(serve_peers, target_daemon)
                with trio.fail_after(VIRTUAL_BOUND_S):
                    while not answers:
                        await trio.sleep(interval_s / 4)
            assert answers == ["unknown"]
            assert trio.current_time() - start >= 10 * interval_s
            assert source.stats.state == "aborted"
            assert hosted.state is VmState.RUNNING, hosted.error
            vm = hosted.vm
            assert vm is not None
            # resume() returns once the vCPU threads were told; they enter KVM_RUN on their own.
            with trio.fail_after(VIRTUAL_BOUND_S):
                while not vm.running:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main, clock=clock)
    finally:
        hosted.close()
        source_daemon.kvm.close()
        target_daemon.kvm.close()
