"""Emulated devices for raw-image guests: an 8250 UART, port 0x92, and the legacy ports' floating
bus, on a port I/O bus that serves a vCPU's KVM_EXIT_IO.

`pc_ports()` builds what a raw guest gets (DESIGN section 7): COM1 (an 8250/16550A) at 0x3f8,
the A20 gate at 0x92, and 0xff from every other port.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .bus import PortBus, PortBusError, PortDevice, PortRange
from .console import ConsoleLog, console_log_path
from .legacy import A20_PORT, A20Gate, DeviceStateError, OpenBus, port_name
from .uart8250 import Sink, Uart8250, UartStateError

COM1_PORT = 0x3F8
COM1 = "com1"
PORT92 = "port92"

__all__ = [
    "A20Gate",
    "COM1",
    "COM1_PORT",
    "ConsoleLog",
    "DeviceStateError",
    "OpenBus",
    "PORT92",
    "PortBus",
    "PortBusError",
    "PortDevice",
    "PortRange",
    "Sink",
    "Uart8250",
    "UartStateError",
    "console_log_path",
    "PcPorts",
    "pc_ports",
    "port_name",
]


@dataclass(frozen=True)
class PcPorts:
    """A raw guest's port devices: the bus to attach to its vCPUs, and the devices on it."""

    bus: PortBus
    uart: Uart8250
    a20: A20Gate
    open_bus: OpenBus


def pc_ports(console_sink: Sink | None = None, on_reset: Callable[[], None] | None = None) -> PcPorts:
    """COM1 at 0x3f8 (its output also to `console_sink`), port 0x92, every other port floating.

    `bus.to_wire()` holds {"com1": ..., "port92": ...}; a target builds the same and calls
    `bus.load_wire()` before its vCPUs first run.
    """
    open_bus = OpenBus()
    uart = Uart8250(sink=console_sink)
    a20 = A20Gate(on_reset=on_reset)
    bus = PortBus(open_bus)
    bus.add(COM1, COM1_PORT, 8, uart)
    bus.add(PORT92, A20_PORT, 1, a20)
    return PcPorts(bus=bus, uart=uart, a20=a20, open_bus=open_bus)
