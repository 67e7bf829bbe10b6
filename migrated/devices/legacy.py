"""The PC's legacy I/O ports that a raw guest may touch: port 0x92 and harmless answers for the rest.

- `A20Gate`, port 0x92 ("system control port A"): bit 1 gates address line 20, bit 0 pulses a
  fast reset. The value written is remembered and read back (and migrates). KVM does not mask
  A20, so memory above 1 MiB is always reachable whatever the guest writes: the gate only has to
  answer as one that was opened, which is what a boot sector checks. A reset pulse is counted and
  reported to `on_reset`; this VMM cannot reset a vCPU, the owner decides what to do.
- `OpenBus`: every port no device claims (the PICs, the PIT, CMOS, the keyboard controller, the
  POST port, other UARTs, PCI configuration, ...). Reads answer 0xff, what a PC's floating bus
  returns for a missing device and what probing code takes for "not there"; writes are ignored.
  Accesses are counted per port, and the last POST code (port 0x80) is kept, for `stats()`.

Both are byte-wide devices with the `io(offset, is_write, data) -> bytes` interface of
`migrated.devices.bus.PortBus`; a wider access touches consecutive ports one byte each.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

A20_PORT = 0x92
A20_ENABLE = 0x02
FAST_RESET = 0x01
FLOATING = 0xFF
POST_PORT = 0x80
WIRE_VERSION = 1

# Names for the ports an old PC had, for statistics and logs (first port, count, name).
LEGACY_PORT_NAMES: tuple[tuple[int, int, str], ...] = (
    (0x00, 0x20, "dma1"),
    (0x20, 2, "pic1"),
    (0x40, 4, "pit"),
    (0x60, 1, "i8042-data"),
    (0x61, 1, "port-b"),
    (0x64, 1, "i8042-status"),
    (0x70, 2, "cmos"),
    (0x80, 1, "post"),
    (0x81, 0x0F, "dma-page"),
    (0xA0, 2, "pic2"),
    (0xC0, 0x20, "dma2"),
    (0xE9, 1, "debugcon"),
    (0xED, 1, "io-delay"),
    (0x170, 8, "ide2"),
    (0x1F0, 8, "ide1"),
    (0x2E8, 8, "com4"),
    (0x2F8, 8, "com2"),
    (0x376, 1, "ide2-ctl"),
    (0x378, 3, "lpt1"),
    (0x3B0, 0x30, "vga"),
    (0x3E8, 8, "com3"),
    (0x3F0, 6, "fdc"),
    (0x3F6, 1, "ide1-ctl"),
    (0x3F7, 1, "fdc-dir"),
    (0x3F8, 8, "com1"),
    (0x4D0, 2, "elcr"),
    (0xCF8, 8, "pci-config"),
)


def port_name(port: int) -> str:
    for first, count, name in LEGACY_PORT_NAMES:
        if first <= port < first + count:
            return name
    return f"{port:#x}"


class DeviceStateError(ValueError):
    """A serialized device state that is malformed; the message names the field."""


class A20Gate:
    """Port 0x92. Starts with A20 open, as a BIOS leaves it before it boots a sector."""

    def __init__(self, on_reset: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self.value = A20_ENABLE
        self.reset_requests = 0
        self._on_reset = on_reset

    @property
    def a20_enabled(self) -> bool:
        return bool(self.value & A20_ENABLE)

    def io(self, offset: int, is_write: bool, data: bytes) -> bytes:
        if offset != 0 or len(data) != 1:
            raise ValueError(f"port 0x92 access at offset {offset} of {len(data)} bytes")
        if not is_write:
            with self._lock:
                return bytes((self.value,))
        with self._lock:
            # Bit 0 is a pulse, not a state: it reads back as 0.
            self.value = data[0] & ~FAST_RESET
            reset = bool(data[0] & FAST_RESET)
            if reset:
                self.reset_requests += 1
        if reset and self._on_reset is not None:
            self._on_reset()
        return b""

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"value": self.value, "a20": self.a20_enabled, "reset_requests": self.reset_requests}

    def to_wire(self) -> dict[str, Any]:
        with self._lock:
            return {"version": WIRE_VERSION, "value": self.value}

    def load_wire(self, wire: object) -> None:
        if not isinstance(wire, Mapping) or set(wire) != {"version", "value"}:
            raise DeviceStateError(f"port92: a map with keys ['value', 'version'], got {_describe(wire)}")
        if wire["version"] != WIRE_VERSION:
            raise DeviceStateError(f"port92.version {wire['version']!r}: this daemon reads {WIRE_VERSION}")
        value = wire["value"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
            raise DeviceStateError(f"port92.value {value!r}: an integer from 0 to 255")
        with self._lock:
            self.value = value & ~FAST_RESET


class OpenBus:
    """Every port nobody claims: reads float to 0xff, writes vanish; both are counted.

    Used as `PortBus`'s default, it sees absolute port numbers as offsets.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reads: Counter[int] = Counter()
        self.writes: Counter[int] = Counter()
        self.last_post_code: int | None = None

    def io(self, offset: int, is_write: bool, data: bytes) -> bytes:
        with self._lock:
            for i in range(len(data)):
                port = (offset + i) & 0xFFFF
                if is_write:
                    self.writes[port] += 1
                    if port == POST_PORT:
                        self.last_post_code = data[i]
                else:
                    self.reads[port] += 1
        return b"" if is_write else bytes((FLOATING,)) * len(data)

    def stats(self) -> dict[str, Any]:
        """Accesses by port name (a name per legacy device, hex for any other port)."""
        with self._lock:
            by_name: Counter[str] = Counter()
            for port, n in self.reads.items():
                by_name[f"{port_name(port)} read"] += n
            for port, n in self.writes.items():
                by_name[f"{port_name(port)} write"] += n
            return {
                "accesses": dict(sorted(by_name.items())),
                "last_post_code": self.last_post_code,
            }


def _describe(value: object) -> str:
    if isinstance(value, Mapping):
        return f"keys {sorted(map(str, value))}"
    return type(value).__name__
