"""Warm peer links between two real daemons (real KVM, real sockets): after a migration to a
peer the source keeps one fresh authenticated link to it idle, and the next migration there
takes it; a link the target closed never fails a migration; idle links end with the daemons and
are bounded on the target (migrated/migration/warmlinks.py, idlelinks.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from daemons import DaemonProcess, heartbeat, wait_for, wait_migration
from helpers import write_key
from hostile import LogWatch, Peer, TargetHost
from migrated.peer import IDLE_LINK
from test_tls import make_ca, make_cert, tls_daemon
from transport import Auth, Connection, Hello, Role, State

pytestmark = pytest.mark.kvm

MEMORY_MIB = 64


def _daemon(tmp_path: Path, name: str, key: Path, peer: str = "", faults: str = "") -> DaemonProcess:
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[peer]\nconnect_timeout_s = 5\n{peer}\n[migration]\nverify = "full"\ndowntime_guard_ms = 60000\n'
    )
    return DaemonProcess(name, tmp_path, key, extra_args=("--config", str(config)), faults=faults).start()


def _create(daemon: DaemonProcess) -> None:
    daemon.call("vm.create", name="vm1", memory_mib=MEMORY_MIB, vcpus=1, dirty_rate_mib_s=1.0, working_set_mib=8)
    wait_for(lambda: heartbeat(daemon, "vm1") > 0, what="the guest's first heartbeat")


def _migrate(source: DaemonProcess, target: DaemonProcess) -> dict[str, Any]:
    """One migration of vm1, completed, with the memory digest checked (verify = full) and the
    guest running on the target with no verification error of its own."""
    source.call("migrate", name="vm1", to=target.address)
    stats = wait_migration(source, "vm1")
    assert stats["state"] == "completed", stats
    assert stats["digest"], stats  # the target's digest matched the source's (verify = full)
    before = target.call("vm.show", name="vm1")
    assert before["state"] == "running", before
    wait_for(lambda: heartbeat(target, "vm1") > before["guest"]["heartbeat_generation"] + 3, what="the heartbeat")
    after = target.call("vm.show", name="vm1")
    assert after["guest"]["verification_errors"] == 0 and after["error"] is None, after
    return stats


def _wait_event(daemon: DaemonProcess, event: str, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        return [e for e in daemon.events(event) if all(e.get(k) == v for k, v in fields.items())]

    wait_for(lambda: len(found()) >= count, timeout=20, what=f"{daemon.name} to log {event} {fields} x{count}")
    return found()


def _connections(daemon: DaemonProcess) -> int:
    """The daemon's established TCP connections: its fds that are sockets found ESTABLISHED in
    /proc/net/tcp (listeners, the control socket and closed peers are not counted)."""
    assert daemon.process is not None
    fd_dir = f"/proc/{daemon.process.pid}/fd"
    inodes = set()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01":  # TCP_ESTABLISHED
                    established.add(fields[9])
    return len(inodes & established)


def _wait_connections(daemon: DaemonProcess, count: int) -> None:
    seen: list[int] = []

    def holds() -> bool:
        seen.append(_connections(daemon))
        return seen[-1] == count

    try:
        wait_for(holds, timeout=10, what=f"{daemon.name} to hold {count} peer connections")
    except AssertionError as err:
        raise AssertionError(f"{err}; it held {sorted(set(seen))}") from None


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return write_key(tmp_path / "peer.key")


def test_migrations_after_the_first_to_a_peer_take_a_warm_link(tmp_path: Path, key: Path) -> None:
    """Ping-pong: A->B and B->A connect afresh; each leaves a warm link behind, which the next
    migration to that peer takes (stats and the setup timeline say so), and memory stays exact."""
    a, b = _daemon(tmp_path, "a", key), _daemon(tmp_path, "b", key)
    try:
        _create(a)
        first = _migrate(a, b)
        assert first["link"] == "fresh", first
        _wait_event(a, "warm_link_ready", peer=b.address)
        second = _migrate(b, a)
        assert second["link"] == "fresh", second  # B never migrated to A before
        _wait_event(b, "warm_link_ready", peer=a.address)
        third = _migrate(a, b)
        assert third["link"] == "warm", third
        fourth = _migrate(b, a)
        assert fourth["link"] == "warm", fourth
        # The warm migration's setup skipped the connect and the handshake: its timeline says so.
        timelines = [e for e in a.events("setup_timeline") if e["migration_id"] == third["migration_id"]]
        assert len(timelines) == 1 and timelines[0]["link"] == "warm", timelines
        marks = timelines[0]["marks_ms"]
        assert "warm_link_taken" in marks and "described" in marks and "connected" not in marks, marks
        assert "phase_steps_ms" in third and "connect" not in third["phase_steps_ms"], third
        # The target names the link the same way (the first came fresh to it).
        incoming = {e["migration_id"]: e["link"] for e in b.events("setup_timeline")}
        assert incoming[first["migration_id"]] == "fresh" and incoming[third["migration_id"]] == "warm", incoming
        # Used once: a fresh link was warmed after it (a second warm_link_ready from A to B).
        _wait_event(a, "warm_link_ready", count=2, peer=b.address)
        _wait_event(b, "warm_link_ready", count=2, peer=a.address)
        # No connection of a used link is left behind: each daemon holds its own idle link to
        # the other and the other's to it, 3 connections each (control and 2 streams), no more.
        _wait_connections(a, 6)
        _wait_connections(b, 6)
        # The target took the idle link as a migration, not as a failed connection.
        assert b.events("idle_link_used"), b.log()[-3000:]
        assert not b.events("incoming_connection_failed"), b.events("incoming_connection_failed")
    finally:
        a.stop()
        b.stop()


def test_a_warm_link_the_target_closed_is_not_used(tmp_path: Path, key: Path) -> None:
    """B closes idle links after 0.3 s: A notices, drops its link, and the next migration
    connects afresh and completes."""
    a = _daemon(tmp_path, "a", key)
    b = _daemon(tmp_path, "b", key, peer="idle_link_timeout_s = 0.3")
    try:
        _create(a)
        _migrate(a, b)
        _wait_event(b, "idle_link_expired")
        _wait_event(a, "warm_link_closed_by_peer", peer=b.address)
        _migrate(b, a)
        stats = _migrate(a, b)
        assert stats["link"] == "fresh", stats
    finally:
        a.stop()
        b.stop()


def test_a_warm_link_found_dead_in_use_falls_back_to_a_fresh_connection(tmp_path: Path, key: Path) -> None:
    """The fault source-warm-link-unwatched hands A's dead link (B closed it at its idle
    deadline) to the next migration, as a close crossing the description would: the description
    gets no answer, A connects afresh once, and the migration completes."""
    a = _daemon(tmp_path, "a", key, faults="source-warm-link-unwatched")
    b = _daemon(tmp_path, "b", key, peer="idle_link_timeout_s = 0.3")
    try:
        _create(a)
        _migrate(a, b)
        _wait_event(a, "warm_link_ready", peer=b.address)
        _wait_event(b, "idle_link_expired")
        _migrate(b, a)
        stats = _migrate(a, b)
        assert stats["link"] == "fresh-after-warm", stats
        assert a.events("warm_link_lost"), a.log()[-3000:]
        # A's streams that went out for the dead link were refused; nothing else failed on B.
        assert not b.events("incoming_vm_refused"), b.events("incoming_vm_refused")
    finally:
        a.stop()
        b.stop()


def test_idle_links_are_closed_when_either_daemon_stops(tmp_path: Path, key: Path) -> None:
    """A stops with an idle link to B: B sees it closed and holds no socket for it any more; B
    stops with one from A: A sees it closed. Both exit cleanly, no task left behind."""
    a, b = _daemon(tmp_path, "a", key), _daemon(tmp_path, "b", key)
    c = _daemon(tmp_path, "c", key)
    try:
        _create(a)
        _migrate(a, b)
        (ready,) = _wait_event(a, "warm_link_ready", peer=b.address)
        assert ready["streams"] == 2, ready  # migration.streams: its data streams are warm too
        # The migration's own connections close; A's idle link and its streams stay.
        _wait_connections(b, 3)
        assert a.stop() == 0
        assert any(e.get("links") == 1 for e in a.events("warm_links_closed")), a.log()[-3000:]
        _wait_event(b, "idle_link_closed_by_source")
        _wait_connections(b, 0)
        # The link's warm streams end with it: not a refusal worth a warning at every stop.
        assert not b.events("data_stream_refused"), b.log()[-3000:]
        # Now B warms a link to C, and B stops: C sees it closed, B exits cleanly.
        _migrate(b, c)
        _wait_event(b, "warm_link_ready", peer=c.address)
        _wait_connections(c, 3)
        assert b.stop() == 0
        _wait_event(c, "idle_link_closed_by_source")
        _wait_connections(c, 0)
        for daemon in (a, b):
            assert "Traceback" not in daemon.log(), daemon.log()[-3000:]
    finally:
        for daemon in (a, b, c):
            daemon.stop()


def _idle_link(target: TargetHost, address: str = "127.0.0.1") -> Peer:
    """An idle link made by hand, as a source's warm link is (Hello offering IDLE_LINK, Auth),
    from `address` (127.0.0.0/8 is all loopback: another address is another peer to B)."""
    host, port = target.daemon.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=(address, 0))
    peer = Peer.__new__(Peer)
    peer.sock, peer.address = sock, "{}:{}".format(*sock.getsockname()[:2])
    peer._conn = conn = Connection(Role.SOURCE, node="many-idle-links", psk=target.key, capabilities=(IDLE_LINK,))
    peer.send(conn.make_hello())
    assert isinstance(peer.receive(), Hello)
    peer.send(conn.make_auth())
    assert isinstance(peer.receive(), Auth)
    assert conn.state is State.READY and conn.negotiated is not None
    assert IDLE_LINK in conn.negotiated.capabilities
    return peer


def _still_open(peer: Peer) -> bool:
    peer.sock.setblocking(False)
    try:
        return peer.sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read: still open
    except ConnectionResetError:
        return False
    finally:
        peer.sock.setblocking(True)


def _held(watch: LogWatch, count: int) -> None:
    wait_for(lambda: len(watch.find("idle_link_held")) >= count, timeout=10, what=f"B to hold {count} idle links")


def _two_held_and_a_third_refused(target: TargetHost, watch: LogWatch, key_named: str) -> list[Peer]:
    """Two idle links from 127.0.0.1, held; a third refused and closed with an error naming
    `key_named`, the two still open. Returns the two (the caller closes them)."""
    links = [_idle_link(target) for _ in range(2)]
    _held(watch, 2)
    refused = _idle_link(target)
    event = watch.wait("idle_link_refused")
    assert key_named in event["error"], event
    refused.closed_by_target()
    refused.sock.close()
    assert all(_still_open(link) for link in links)
    return links


def test_idle_links_over_the_limits_are_refused_with_a_logged_error(tmp_path: Path, key: Path) -> None:
    """A peer that opens more idle links than B allows from one address (2) gets the extra one
    refused and closed, with an error naming the key; B's total (3) holds the same way for
    another address; the links B kept stay open, and a slot freed is taken again."""
    b = _daemon(tmp_path, "b", key, peer="max_idle_links = 3\nmax_idle_links_per_peer = 2")
    target = TargetHost(b, key.read_bytes(), {})
    links: list[Peer] = []
    try:
        watch = LogWatch(b)
        links = _two_held_and_a_third_refused(target, watch, "peer.max_idle_links_per_peer = 2")
        links.append(_idle_link(target, "127.0.0.2"))
        _held(watch, 3)
        over_total = _idle_link(target, "127.0.0.2")
        wait_for(lambda: len(watch.find("idle_link_refused")) == 2, timeout=10, what="B to refuse the 4th link")
        assert "peer.max_idle_links = 3" in watch.find("idle_link_refused")[1]["error"], watch.events()[-5:]
        over_total.closed_by_target()
        over_total.sock.close()
        assert all(_still_open(link) for link in links)
        # A link that leaves frees its slot: the next one from that address is held.
        links.pop(0).sock.close()
        watch.wait("idle_link_closed_by_source")
        links.append(_idle_link(target))
        _held(watch, 4)
        assert len(watch.find("idle_link_refused")) == 2 and all(_still_open(link) for link in links)
        assert "Traceback" not in b.log()
    finally:
        for link in links:
            link.sock.close()
        b.stop()


def test_warm_links_over_mutual_tls(tmp_path: Path) -> None:
    """With TLS each warm link has its own TLS handshake; what the server sends after it (TLS 1.3
    session tickets) is read within the link's own handshake, so the idle link stays quiet and
    the third migration takes it."""
    ca = make_ca(tmp_path, "migration")
    a = tls_daemon(tmp_path, "a", make_cert(tmp_path, "a", ca), ca[1]).start()
    b = tls_daemon(tmp_path, "b", make_cert(tmp_path, "b", ca), ca[1]).start()
    try:
        _create(a)
        assert _migrate(a, b)["link"] == "fresh"
        _migrate(b, a)
        _wait_event(a, "warm_link_ready", peer=b.address)
        assert _migrate(a, b)["link"] == "warm"
        assert not a.events("warm_link_dead") and not a.events("warm_link_closed_by_peer")
    finally:
        a.stop()
        b.stop()


def test_warm_links_switched_off_connect_every_migration_afresh(tmp_path: Path, key: Path) -> None:
    a = _daemon(tmp_path, "a", key, peer="warm_links = false")
    b = _daemon(tmp_path, "b", key, peer="warm_links = false")
    try:
        _create(a)
        links = [_migrate(a, b)["link"], _migrate(b, a)["link"], _migrate(a, b)["link"]]
        assert links == ["fresh", "fresh", "fresh"], links
        assert not a.events("warm_link_ready") and not b.events("warm_link_ready")
        assert not b.events("idle_link_held") and not a.events("idle_link_held")
    finally:
        a.stop()
        b.stop()


def test_a_migration_with_another_stream_count_leaves_the_warm_link_and_connects_afresh(
    tmp_path: Path, key: Path
) -> None:
    """The warm link's data streams (migration.streams = 2) are held by the target for it: a
    migration asking for 3 streams does not mix its own with them; it closes the warm link and
    connects afresh, and completes."""
    a, b = _daemon(tmp_path, "a", key), _daemon(tmp_path, "b", key)
    try:
        _create(a)
        _migrate(a, b)
        _migrate(b, a)
        _wait_event(a, "warm_link_ready", peer=b.address)
        a.call("migrate", name="vm1", to=b.address, streams=3)
        stats = wait_migration(a, "vm1")
        assert stats["state"] == "completed" and stats["link"] == "fresh", stats
        assert any(e["streams"] == 2 and e["wanted"] == 3 for e in a.events("warm_link_not_used"))
        wait_for(lambda: heartbeat(b, "vm1") > 0, what="the guest on B")
        assert b.call("vm.show", name="vm1")["guest"]["verification_errors"] == 0
        # The next migration with the default count takes the link warmed after this one.
        _migrate(b, a)
        _wait_event(a, "warm_link_ready", count=2, peer=b.address)
        assert _migrate(a, b)["link"] == "warm"
    finally:
        a.stop()
        b.stop()


def test_idle_links_count_against_the_incoming_migrations_limit(tmp_path: Path, key: Path) -> None:
    """An idle link is a migration to come: with migration.max_incoming = 2, B keeps two idle
    links and refuses a third, naming that key, though its idle-link limits would allow it."""
    config = tmp_path / "b.toml"
    config.write_text("[peer]\nconnect_timeout_s = 5\nmax_idle_links_per_peer = 8\n[migration]\nmax_incoming = 2\n")
    b = DaemonProcess("b", tmp_path, key, extra_args=("--config", str(config))).start()
    target = TargetHost(b, key.read_bytes(), {})
    links: list[Peer] = []
    try:
        watch = LogWatch(b)
        links = _two_held_and_a_third_refused(target, watch, "migration.max_incoming = 2")
    finally:
        for link in links:
            link.sock.close()
        b.stop()
