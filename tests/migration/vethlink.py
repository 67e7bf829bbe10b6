"""A real link that can be cut or slowed: two network namespaces joined by a veth pair (the
`link` fixture in conftest.py). Used by test_link_cut.py and test_slow_link.py."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    ns_a: str
    ns_b: str
    addr_a: str
    addr_b: str
    dev_a: str

    def cut(self) -> None:
        subprocess.run(["ip", "-n", self.ns_a, "link", "set", self.dev_a, "down"], check=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def veth_link() -> Iterator[Link]:
    tag = os.urandom(3).hex()
    ns_a, ns_b, dev_a, dev_b = f"mga-{tag}", f"mgb-{tag}", f"va{tag}", f"vb{tag}"
    addr_a, addr_b = "10.213.0.1", "10.213.0.2"
    _ip("netns", "add", ns_a)
    _ip("netns", "add", ns_b)
    try:
        _ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        _ip("link", "set", dev_a, "netns", ns_a)
        _ip("link", "set", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield Link(ns_a, ns_b, addr_a, addr_b, dev_a)
    finally:
        subprocess.run(["ip", "netns", "del", ns_a], check=False)
        subprocess.run(["ip", "netns", "del", ns_b], check=False)
