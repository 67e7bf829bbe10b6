"""The port I/O bus: turns a vCPU's KVM_EXIT_IO into calls on the devices that own the ports.

api.rst (KVM_EXIT_IO): "data_offset describes where the data is located (KVM_EXIT_IO_OUT) or
where kvm expects application code to place the data for the next KVM_RUN invocation
(KVM_EXIT_IO_IN). Data format is a packed array." -- `count` elements of `size` bytes each, all
for the same port (string I/O, `rep outsb` and friends, gives count > 1).

Devices are registered by port range. An access that lies inside one range goes to its device
whole; one that straddles ranges is split into byte accesses, as the ISA bus splits a wide access
to 8-bit devices. Ports nobody claims go to the default device (`OpenBus`: reads 0xff).

The bus also carries the devices' state for migration: `to_wire()` gives each stateful device's
state under its name, `load_wire()` puts it back into a bus built the same way.

Threads: exits arrive on vCPU threads; one lock serializes them, so devices see one access at a
time even with several vCPUs.
"""

from __future__ import annotations

import ctypes
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from migrated.kvm import uapi
from migrated.kvm.vcpu import Vcpu

from .legacy import DeviceStateError, OpenBus

PORTS = 0x10000
# KVM puts the data in the page after struct kvm_run (KVM_PIO_PAGE_OFFSET) and never more
# than that page holds.
MAX_IO_BYTES = 4096
COMPLETION_EXITS = 64


class PortDevice(Protocol):
    def io(self, offset: int, is_write: bool, data: bytes) -> bytes:
        """One access at `offset` from the device's first port. A read gets `data` of the
        access's width (its content is meaningless) and returns as many bytes; a write
        returns b""."""
        ...


class StatefulDevice(PortDevice, Protocol):
    def to_wire(self) -> dict[str, Any]: ...

    def load_wire(self, wire: object) -> None: ...


class PortBusError(RuntimeError):
    """A port I/O exit the bus cannot serve (an impossible size or count from KVM)."""


@dataclass(frozen=True)
class PortRange:
    name: str
    first: int
    count: int
    device: PortDevice

    @property
    def end(self) -> int:
        return self.first + self.count


class PortBus:
    def __init__(self, default: PortDevice | None = None) -> None:
        self.default: PortDevice = default if default is not None else OpenBus()
        self._lock = threading.Lock()
        self._ranges: dict[str, PortRange] = {}
        self._by_port: dict[int, PortRange] = {}
        self.exits: Counter[str] = Counter()

    def add(self, name: str, first: int, count: int, device: PortDevice) -> None:
        """Give ports [first, first + count) to `device` under `name` (unique on this bus)."""
        if not 0 <= first < first + count <= PORTS:
            raise ValueError(f"port range {first:#x}+{count}: must lie within 0-0xffff")
        if name in self._ranges:
            raise ValueError(f"a device named {name!r} is already on this bus")
        for port in range(first, first + count):
            if port in self._by_port:
                other = self._by_port[port]
                raise ValueError(
                    f"{name} at {first:#x}-{first + count - 1:#x} overlaps {other.name} at "
                    f"{other.first:#x}-{other.end - 1:#x}"
                )
        entry = PortRange(name, first, count, device)
        with self._lock:
            self._ranges[name] = entry
            for port in range(first, first + count):
                self._by_port[port] = entry

    def device(self, name: str) -> PortDevice:
        return self._ranges[name].device

    @property
    def ranges(self) -> list[PortRange]:
        return sorted(self._ranges.values(), key=lambda r: r.first)

    # ---- accesses ------------------------------------------------------------------------

    def access(self, port: int, is_write: bool, data: bytes) -> bytes:
        """One access of len(data) bytes at `port`; returns what a read gives (b"" for writes)."""
        with self._lock:
            return self._access(port, is_write, data)

    def _access(self, port: int, is_write: bool, data: bytes) -> bytes:
        entry = self._by_port.get(port)
        width = len(data)
        if all(self._by_port.get((port + i) & 0xFFFF) is entry for i in range(1, width)):
            if entry is None:
                return self.default.io(port, is_write, data)
            return entry.device.io(port - entry.first, is_write, data)
        out = bytearray()
        for i in range(width):
            out += self._access((port + i) & 0xFFFF, is_write, data[i : i + 1])
        return bytes(out)

    def handle_io_exit(self, vcpu: Vcpu) -> None:
        """The KVM_EXIT_IO handler: `vcpu.handlers[uapi.KVM_EXIT_IO] = bus.handle_io_exit`."""
        io = vcpu.run.exit.io
        size, count, port = int(io.size), int(io.count), int(io.port)
        if size not in (1, 2, 4) or not 1 <= count or size * count > MAX_IO_BYTES:
            raise PortBusError(
                f"vCPU {vcpu.index}: KVM_EXIT_IO at port {port:#x} with size {size}, count "
                f"{count}: sizes are 1, 2 or 4 and the data at most {MAX_IO_BYTES} bytes"
            )
        address = vcpu.run_address + int(io.data_offset)
        with self._lock:
            if io.direction == uapi.KVM_EXIT_IO_OUT:
                self.exits["out"] += 1
                data = ctypes.string_at(address, size * count)
                for i in range(count):
                    self._access(port, True, data[i * size : (i + 1) * size])
            else:
                self.exits["in"] += 1
                blank = bytes(size)
                result = b"".join(self._access(port, False, blank) for _ in range(count))
                ctypes.memmove(address, result, len(result))

    def attach(self, vcpu: Vcpu) -> None:
        vcpu.handlers[uapi.KVM_EXIT_IO] = self.handle_io_exit

    # ---- state and statistics ------------------------------------------------------------

    def _stateful(self) -> dict[str, StatefulDevice]:
        return {
            name: entry.device  # type: ignore[misc]
            for name, entry in self._ranges.items()
            if hasattr(entry.device, "to_wire") and hasattr(entry.device, "load_wire")
        }

    def to_wire(self) -> dict[str, Any]:
        """Every stateful device's state by name (msgpack-able). The vCPUs must be parked."""
        with self._lock:
            return {name: device.to_wire() for name, device in self._stateful().items()}

    def load_wire(self, wire: object) -> None:
        """Restore what `to_wire` gave into this bus, built with the same devices."""
        devices = self._stateful()
        if not isinstance(wire, Mapping) or set(wire) != set(devices):
            got = sorted(map(str, wire)) if isinstance(wire, Mapping) else type(wire).__name__
            raise DeviceStateError(f"device state for {got}: this VM's port devices with state are {sorted(devices)}")
        with self._lock:
            for name, device in devices.items():
                device.load_wire(wire[name])

    def stats(self) -> dict[str, Any]:
        devices: dict[str, Any] = {}
        for name, entry in self._ranges.items():
            stats = getattr(entry.device, "stats", None)
            if callable(stats):
                devices[name] = stats()
        default_stats = getattr(self.default, "stats", None)
        if callable(default_stats):
            devices["unclaimed"] = default_stats()
        with self._lock:
            return {"exits": dict(self.exits), "devices": devices}
