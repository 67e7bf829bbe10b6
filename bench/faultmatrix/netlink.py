"""Two network namespaces joined by a veth pair: a link that can be cut and slowed for real."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Link:
    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str = "10.213.7.1"
    addr_b: str = "10.213.7.2"

    @classmethod
    def create(cls) -> Link:
        tag = os.urandom(3).hex()
        link = cls(f"fma-{tag}", f"fmb-{tag}", f"fa{tag}", f"fb{tag}")
        _ip("netns", "add", link.ns_a)
        _ip("netns", "add", link.ns_b)
        try:
            _ip("link", "add", link.dev_a, "type", "veth", "peer", "name", link.dev_b)
            _ip("link", "set", link.dev_a, "netns", link.ns_a)
            _ip("link", "set", link.dev_b, "netns", link.ns_b)
            for ns, dev, addr in ((link.ns_a, link.dev_a, link.addr_a), (link.ns_b, link.dev_b, link.addr_b)):
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            link.destroy()
            raise
        return link

    def destroy(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def down(self) -> None:
        # No RST, no FIN: the bytes stop, as with a pulled cable.
        _ip("-n", self.ns_a, "link", "set", self.dev_a, "down")

    def up(self) -> None:
        _ip("-n", self.ns_a, "link", "set", self.dev_a, "up")

    def slow(self) -> None:
        # tbf works inside a namespace on this host; netem does not (HOST-NOTES.md).
        for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", "10mbit", "burst", "32kbit", "latency", "400ms"],
                check=True,
                capture_output=True,
            )  # fmt: skip

    def unslow(self) -> None:
        for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
