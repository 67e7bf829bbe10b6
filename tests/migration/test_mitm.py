"""A man in the middle between two real daemons (issue 10, DESIGN section 6).

Daemon A migrates a live workload VM to daemon B through `mitm.Proxy`, a real TCP proxy in this
test that changes the stream as an attacker on the path would. Each attack is one the issue saw
succeed against psk mode when only the handshake was authenticated (the stream in the clear,
protocol version 1): there each of these migrations completed, with the target's guest counting
verification errors or running on pages it never should have had. Where the attack would
otherwise be caught by a count or a digest, the proxy also rewrites Done and Loaded to cover it,
as the issue's proxy did.

Now every one must end the migration, with the VM running on A, nothing of it left on B, no
verification error anywhere, and the logs naming the record that failed authentication.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import MakeDaemon
from daemons import DaemonProcess, wait_for, wait_migration
from mitm import PREFIX, S2T, T2S, Attack, Link, Proxy, Unit, flip_bit, frame, rewritten

pytestmark = pytest.mark.kvm

PAGE = 4096
VM = {"memory_mib": 128, "vcpus": 1, "dirty_rate_mib_s": 32, "working_set_mib": 16}


def entries(unit: Unit) -> int:
    return int(unit.fields["n_pages"]) + int(unit.fields["n_zero"])


def is_data_batch(unit: Unit) -> bool:
    return unit.direction == S2T and unit.kind == "page_batch" and int(unit.fields.get("n_pages", 0)) > 0


def cover_done(link: Link, unit: Unit) -> bytes:
    """Done with pages_total moved by what the attack added or removed, so no count betrays it."""
    fields = dict(unit.fields, pages_total=int(unit.fields["pages_total"]) + link.notes.get("delta", 0))
    return rewritten(unit, frame({"t": "done", **fields}))


def with_cover(attack: Attack) -> Attack:
    def wrapped(link: Link, unit: Unit) -> list[bytes]:
        if unit.direction == S2T and unit.kind == "done" and link.notes.get("delta"):
            link.notes["covered"] = True
            return [cover_done(link, unit)]
        return attack(link, unit)

    return wrapped


def flip_page_data(link: Link, unit: Unit) -> list[bytes]:
    """One bit in the middle of the last page of every page batch with data."""
    if not is_data_batch(unit):
        return [unit.raw]
    header_len, _ = PREFIX.unpack_from(unit.plain)
    offset = PREFIX.size + header_len + 8 * entries(unit) + PAGE * (int(unit.fields["n_pages"]) - 1) + PAGE // 2
    link.notes["fired"] = link.notes.get("fired", 0) + 1
    return [flip_bit(unit, offset)]


def rewrite_done(link: Link, unit: Unit) -> list[bytes]:
    """Done turned to verify off without a digest; the source's digest put back into Loaded."""
    if unit.direction == S2T and unit.kind == "done":
        link.notes["digest"] = unit.fields["digest"]
        link.notes["fired"] = 1
        forged = {"t": "done", "pages_total": unit.fields["pages_total"], "digest": None, "verify": "off"}
        return [rewritten(unit, frame(forged))]
    if unit.direction == T2S and unit.kind == "loaded" and "digest" in link.notes:
        return [rewritten(unit, frame({"t": "loaded", "digest": link.notes["digest"]}))]
    return [unit.raw]


def drop_batch(link: Link, unit: Unit) -> list[bytes]:
    """The second page batch with data never arrives."""
    if is_data_batch(unit):
        seen = link.notes["seen"] = link.notes.get("seen", 0) + 1
        if seen == 2:
            link.notes["fired"] = 1
            link.notes["delta"] = -entries(unit)
            return []
    return [unit.raw]


def replay_batch(link: Link, unit: Unit) -> list[bytes]:
    """The first page batch with data, sent again just before the device state: old pages."""
    if is_data_batch(unit) and "first" not in link.notes:
        link.notes["first"] = unit
    if unit.direction == S2T and unit.kind == "device_state" and "first" in link.notes and "fired" not in link.notes:
        link.notes["fired"] = 1
        link.notes["delta"] = entries(link.notes["first"])
        return [link.notes["first"].raw, unit.raw]
    return [unit.raw]


def inject_frame(link: Link, unit: Unit) -> list[bytes]:
    """A page batch of our own, just before the device state: a page the guest wrote, zeroed."""
    if is_data_batch(unit) and "page" not in link.notes:
        payload = unit.payload()
        link.notes["page"] = (int(unit.fields["slot"]), int.from_bytes(payload[:8], "little"))
    if unit.direction == S2T and unit.kind == "device_state" and "page" in link.notes and "fired" not in link.notes:
        slot, page = link.notes["page"]
        link.notes["fired"] = 1
        link.notes["delta"] = 1
        header = {"t": "page_batch", "slot": slot, "round": 0, "n_pages": 0, "n_zero": 1}
        return [frame(header, struct.pack("<Q", page)), unit.raw]
    return [unit.raw]


ATTACKS: dict[str, tuple[Attack, str]] = {
    "flipped bit in page data": (flip_page_data, "off"),
    "rewritten done": (rewrite_done, "full"),
    "dropped batch": (with_cover(drop_batch), "off"),
    "replayed batch": (with_cover(replay_batch), "off"),
    "injected frame": (with_cover(inject_frame), "off"),
}


@pytest.fixture
def pair(make_daemon: MakeDaemon, tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess, bytes]]:
    a, b = make_daemon("a"), make_daemon("b")
    a.call("vm.create", name="vm1", **VM)
    wait_for(lambda: guest(a)["heartbeat_generation"] > 0, what="the guest's first heartbeat")
    yield a, b, (tmp_path / "peer.key").read_bytes()


def guest(daemon: DaemonProcess) -> dict[str, Any]:
    return dict(daemon.call("vm.show", name="vm1")["guest"])


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_man_in_the_middle_ends_the_migration_and_the_vm_runs_on_the_source(
    pair: tuple[DaemonProcess, DaemonProcess, bytes], name: str
) -> None:
    a, b, psk = pair
    attack, verify = ATTACKS[name]
    proxy = Proxy(b.address, psk, attack)
    try:
        a.call("migrate", name="vm1", to=proxy.address, verify=verify)
        stats = wait_migration(a, "vm1")
    finally:
        proxy.close()
    assert not proxy.errors, proxy.errors
    assert len(proxy.links) == 1 and proxy.links[0].notes.get("fired"), f"the attack never found its target: {name}"

    assert stats["state"] == "failed", f"{name}: the migration went on through the attack: {stats}"
    # The VM runs on A, its guest checking every page it rewrites: no verification error.
    before = guest(a)
    assert a.call("vm.show", name="vm1")["state"] == "running"
    wait_for(lambda: guest(a)["heartbeat_generation"] > before["heartbeat_generation"] + 5, what="the heartbeat on A")
    assert guest(a)["verification_errors"] == 0, guest(a)
    # B discarded its copy and goes on serving.
    wait_for(lambda: "vm1" not in [vm["name"] for vm in b.call("vm.list")], what="B to discard its copy")
    assert b.alive() and b.call("daemon.status")["vms"] == 0
    # It was the sealed stream that caught it, named in one of the two logs.
    logs = a.log() + b.log()
    assert "failed authentication" in logs or "sealed record" in logs, logs[-3000:]
