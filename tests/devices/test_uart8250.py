"""The raw guest's devices without KVM: the 8250 UART's registers, its output buffer and state;
port 0x92 and the floating legacy ports; the port bus serving KVM_EXIT_IO (string I/O included)
from a kvm_run laid out in ordinary memory."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import msgpack
import pytest

from migrated.devices import (
    COM1,
    COM1_PORT,
    PORT92,
    A20Gate,
    ConsoleLog,
    DeviceStateError,
    OpenBus,
    PortBus,
    PortBusError,
    Uart8250,
    UartStateError,
    console_log_path,
    pc_ports,
)
from migrated.devices import uart8250 as u
from migrated.kvm import uapi

THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


def rd(uart: Uart8250, reg: int) -> int:
    return uart.io(reg, False, b"\0")[0]


def wr(uart: Uart8250, reg: int, value: int) -> None:
    assert uart.io(reg, True, bytes((value,))) == b""


# ---- UART registers ----------------------------------------------------------------------


def test_reset_values() -> None:
    uart = Uart8250()
    assert rd(uart, IER) == 0
    assert rd(uart, IIR) == u.IIR_NO_INT
    assert rd(uart, LCR) == 0x03
    assert rd(uart, MCR) == 0x08
    assert rd(uart, LSR) == u.LSR_THRE | u.LSR_TEMT
    assert rd(uart, MSR) == u.MSR_CONNECTED
    assert rd(uart, SCR) == 0
    assert rd(uart, RBR) == 0  # nothing received


def test_transmit_appends_to_output_and_sink() -> None:
    sunk: list[bytes] = []
    uart = Uart8250(sink=sunk.append)
    for byte in b"hi\n":
        assert rd(uart, LSR) & u.LSR_THRE  # a polling guest never waits
        wr(uart, THR, byte)
    assert uart.output == b"hi\n"
    assert b"".join(sunk) == b"hi\n"
    assert uart.output_total == 3
    assert rd(uart, LSR) == u.LSR_THRE | u.LSR_TEMT


def test_dlab_switches_offsets_0_and_1_to_the_divisor() -> None:
    uart = Uart8250()
    wr(uart, IER, 0x05)
    wr(uart, LCR, 0x80 | 0x03)
    wr(uart, DLL, 0x01)
    wr(uart, DLM, 0x02)
    assert (rd(uart, DLL), rd(uart, DLM)) == (0x01, 0x02)
    assert uart.output == b""  # a DLL write transmits nothing
    wr(uart, LCR, 0x03)
    assert (uart.dll, uart.dlm) == (0x01, 0x02)
    assert rd(uart, IER) == 0x05  # IER untouched by the divisor writes
    wr(uart, THR, ord("x"))
    assert uart.output == b"x"


def test_scratch_mcr_lcr_read_back_and_lsr_msr_ignore_writes() -> None:
    uart = Uart8250()
    wr(uart, SCR, 0x5A)
    wr(uart, LCR, 0x1B)
    wr(uart, MCR, 0xFF)
    wr(uart, LSR, 0x00)
    wr(uart, MSR, 0x00)
    assert (rd(uart, SCR), rd(uart, LCR), rd(uart, MCR)) == (0x5A, 0x1B, u.MCR_MASK)
    assert rd(uart, LSR) == u.LSR_THRE | u.LSR_TEMT


def test_receive_fifo_sets_data_ready_and_reads_in_order() -> None:
    uart = Uart8250()
    assert uart.feed(b"ab") == 2
    assert rd(uart, LSR) & u.LSR_DR
    assert bytes((rd(uart, RBR), rd(uart, RBR))) == b"ab"
    assert not rd(uart, LSR) & u.LSR_DR
    uart.feed(b"c")
    wr(uart, FCR, u.FCR_ENABLE | u.FCR_CLEAR_RX)
    assert not rd(uart, LSR) & u.LSR_DR


def test_receive_fifo_is_bounded() -> None:
    uart = Uart8250()
    assert uart.feed(bytes(u.RX_BYTES + 10)) == u.RX_BYTES
    assert uart.rx_dropped == 10


def test_iir_reports_enabled_sources_and_fifo_bits() -> None:
    uart = Uart8250()
    wr(uart, FCR, 0xC7)
    assert uart.fcr == 0xC1
    assert rd(uart, IIR) == 0xC0 | u.IIR_NO_INT
    wr(uart, IER, u.IER_THRI)  # enabling THRI with THR empty raises it at once
    assert uart.interrupt_pending
    assert rd(uart, IIR) == 0xC0 | u.IIR_THRI
    assert rd(uart, IIR) == 0xC0 | u.IIR_NO_INT  # reading IIR cleared it
    wr(uart, THR, ord("a"))  # THR empties again: raised again
    assert rd(uart, IIR) & 0x0F == u.IIR_THRI
    wr(uart, IER, u.IER_THRI | u.IER_RDI)
    uart.feed(b"z")
    assert rd(uart, IIR) & 0x0F == u.IIR_RDI  # received data ranks above THR empty
    rd(uart, RBR)
    assert rd(uart, IIR) & 0x0F == u.IIR_NO_INT
    wr(uart, IER, 0)
    assert not uart.interrupt_pending


def test_loopback_routes_thr_to_rbr_and_mcr_to_msr() -> None:
    uart = Uart8250()
    wr(uart, MCR, u.MCR_LOOP | 0x0F)  # loop, DTR, RTS, OUT1, OUT2
    wr(uart, THR, 0x42)
    assert uart.output == b""
    assert rd(uart, LSR) & u.LSR_DR
    assert rd(uart, RBR) == 0x42
    assert rd(uart, MSR) == 0xF0
    wr(uart, MCR, u.MCR_LOOP | 0x01)  # DTR only -> DSR only
    assert rd(uart, MSR) == 0x20
    wr(uart, MCR, 0x0B)
    assert rd(uart, MSR) == u.MSR_CONNECTED


def test_wide_access_touches_consecutive_registers() -> None:
    uart = Uart8250()
    uart.io(SCR - 1, True, b"\x00\x77")  # MSR (ignored), then SCR
    assert rd(uart, SCR) == 0x77
    assert uart.io(LSR, False, b"\0\0\0") == bytes((0x60, u.MSR_CONNECTED, 0x77))
    with pytest.raises(ValueError, match="registers are 0-7"):
        uart.io(7, False, b"\0\0")


def test_output_buffer_keeps_the_most_recent_bytes() -> None:
    uart = Uart8250(output_bytes=10)
    for byte in b"0123456789abcdef":
        wr(uart, THR, byte)
    assert uart.output == b"6789abcdef"
    assert uart.output_total == 16
    assert uart.read_output(since=14) == (b"ef", 16)
    assert uart.read_output(since=2) == (b"6789abcdef", 16)  # older bytes are gone
    assert uart.read_output(since=16) == (b"", 16)


def test_default_output_bound_is_64_kib() -> None:
    uart = Uart8250()
    for i in range(u.OUTPUT_BYTES + 100):
        wr(uart, THR, i & 0xFF)
    assert len(uart.output) == u.OUTPUT_BYTES == 64 << 10
    assert uart.output[-1] == (u.OUTPUT_BYTES + 99) & 0xFF


def test_a_failing_sink_is_dropped_and_the_guest_goes_on() -> None:
    def sink(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    uart = Uart8250(sink=sink)
    wr(uart, THR, ord("a"))
    wr(uart, THR, ord("b"))
    assert uart.output == b"ab"
    assert uart.sink_error is not None and "No space left" in uart.sink_error
    assert uart.stats()["sink_error"] == uart.sink_error


# ---- UART state --------------------------------------------------------------------------


def busy_uart() -> Uart8250:
    uart = Uart8250()
    wr(uart, LCR, 0x80)
    wr(uart, DLL, 0x01)
    wr(uart, DLM, 0x00)
    wr(uart, LCR, 0x1B)
    wr(uart, FCR, 0xC7)
    wr(uart, IER, 0x03)
    wr(uart, MCR, 0x0B)
    wr(uart, SCR, 0x99)
    for byte in b"booted\n":
        wr(uart, THR, byte)
    uart.feed(b"typed")
    return uart


def test_state_round_trip_through_msgpack() -> None:
    source = busy_uart()
    wire = msgpack.unpackb(msgpack.packb(source.to_wire(), use_bin_type=True), raw=False)
    sunk: list[bytes] = []
    target = Uart8250.from_wire(wire, sink=sunk.append)
    assert target.to_wire() == source.to_wire()
    for reg in (IER, IIR, LCR, MCR, LSR, MSR, SCR):
        assert rd(target, reg) == rd(source, reg), reg
    assert target.output == b"booted\n"
    assert bytes(rd(target, RBR) for _ in range(5)) == b"typed"
    wr(target, THR, ord("!"))
    assert target.read_output(since=7) == (b"!", 8)
    assert sunk == [b"!"]  # the sink belongs to the target's host; it sees only new output


def test_load_wire_keeps_the_sink() -> None:
    sunk: list[bytes] = []
    uart = Uart8250(sink=sunk.append)
    uart.load_wire(busy_uart().to_wire())
    wr(uart, THR, ord("x"))
    assert sunk == [b"x"]


def _mutated(**changes: Any) -> dict[str, Any]:
    wire = busy_uart().to_wire()
    for key, value in changes.items():
        if value is KeyError:
            del wire[key]
        else:
            wire[key] = value
    return wire


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ([], "uart: a map"),
        (_mutated(lcr=KeyError), r"missing keys \['lcr'\]"),
        (_mutated(extra=1), r"unknown keys \['extra'\]"),
        (_mutated(version=2), "uart.version 2"),
        (_mutated(ier=256), "uart.ier 256"),
        (_mutated(dll=-1), "uart.dll -1"),
        (_mutated(scr=True), "uart.scr True"),
        (_mutated(thre_pending=1), "uart.thre_pending: a bool"),
        (_mutated(rx="abc"), "uart.rx: bytes"),
        (_mutated(rx=bytes(u.RX_BYTES + 1)), "uart.rx: 4097 bytes"),
        (_mutated(output=bytes(u.OUTPUT_BYTES + 1)), "uart.output: 65537 bytes"),
        (_mutated(output_total=3), "uart.output_total 3"),
        (_mutated(output_total="7"), "uart.output_total '7'"),
    ],
)
def test_from_wire_refuses_malformed_state(wire: Any, match: str) -> None:
    uart = busy_uart()
    before = uart.to_wire()
    with pytest.raises(UartStateError, match=match):
        uart.load_wire(wire)
    assert uart.to_wire() == before  # nothing changed


# ---- port 0x92 and the floating bus ------------------------------------------------------


def test_a20_gate_remembers_and_counts_reset_pulses() -> None:
    resets: list[int] = []
    gate = A20Gate(on_reset=lambda: resets.append(1))
    assert gate.io(0, False, b"\0") == b"\x02" and gate.a20_enabled
    gate.io(0, True, b"\x00")
    assert gate.io(0, False, b"\0") == b"\x00" and not gate.a20_enabled
    gate.io(0, True, b"\x03")  # A20 on plus a reset pulse
    assert gate.io(0, False, b"\0") == b"\x02"  # the pulse bit reads back 0
    assert gate.reset_requests == 1 and resets == [1]
    clone = A20Gate()
    clone.load_wire(gate.to_wire())
    assert clone.value == 0x02
    with pytest.raises(DeviceStateError, match="port92.value 300"):
        clone.load_wire({"version": 1, "value": 300})
    with pytest.raises(DeviceStateError, match="port92: a map"):
        clone.load_wire({"value": 2})


def test_open_bus_floats_reads_ignores_writes_and_counts() -> None:
    bus = OpenBus()
    assert bus.io(0x21, False, b"\0") == b"\xff"
    assert bus.io(0x40, False, b"\0\0") == b"\xff\xff"  # a word read: 0x40 and 0x41
    assert bus.io(0x80, True, b"\x2a") == b""
    assert bus.io(0x1234, True, b"\x00") == b""
    stats = bus.stats()
    assert stats["last_post_code"] == 0x2A
    assert stats["accesses"] == {"pic1 read": 1, "pit read": 2, "post write": 1, "0x1234 write": 1}


# ---- the bus -----------------------------------------------------------------------------


def test_bus_dispatches_by_range_with_offsets() -> None:
    ports = pc_ports()
    bus = ports.bus
    for byte in b"ok":
        bus.access(COM1_PORT, True, bytes((byte,)))
    assert ports.uart.output == b"ok"
    assert bus.access(COM1_PORT + LSR, False, b"\0") == b"\x60"
    assert bus.access(0x92, False, b"\0") == b"\x02"
    assert bus.access(0x64, False, b"\0") == b"\xff"
    assert bus.access(0x3F7, False, b"\0\0") == b"\xff\x00"  # straddles fdc-dir and COM1's RBR
    assert bus.access(0x3FF, False, b"\0\0") == b"\x00\xff"  # COM1's SCR, then nobody
    assert ports.open_bus.reads[0x400] == 1


def test_bus_refuses_overlaps_and_duplicate_names() -> None:
    bus = PortBus()
    bus.add("a", 0x3F8, 8, Uart8250())
    with pytest.raises(ValueError, match="b at 0x3fc-0x3fc overlaps a at 0x3f8-0x3ff"):
        bus.add("b", 0x3FC, 1, A20Gate())
    with pytest.raises(ValueError, match="already on this bus"):
        bus.add("a", 0x2F8, 8, Uart8250())
    with pytest.raises(ValueError, match="within 0-0xffff"):
        bus.add("c", 0xFFFF, 2, A20Gate())


def test_bus_state_round_trip_and_refusals() -> None:
    source = pc_ports()
    for byte in b"abc":
        source.bus.access(COM1_PORT, True, bytes((byte,)))
    source.bus.access(0x92, True, b"\x00")
    wire = msgpack.unpackb(msgpack.packb(source.bus.to_wire(), use_bin_type=True), raw=False)
    assert set(wire) == {COM1, PORT92}
    target = pc_ports()
    target.bus.load_wire(wire)
    assert target.uart.output == b"abc"
    assert target.a20.value == 0
    with pytest.raises(DeviceStateError, match=r"device state for \['com1'\]"):
        target.bus.load_wire({COM1: wire[COM1]})
    with pytest.raises(DeviceStateError, match="device state for list"):
        target.bus.load_wire([])


class FakeVcpu:
    """What `PortBus.handle_io_exit` reads: a kvm_run with its PIO data page after it."""

    def __init__(self) -> None:
        self.index = 0
        self.memory = ctypes.create_string_buffer(3 * 4096)
        self.run_address = ctypes.addressof(self.memory)
        self.run = uapi.kvm_run.from_address(self.run_address)

    def exit_io(self, direction: int, port: int, size: int, data: bytes = b"", count: int = 1) -> None:
        self.run.exit_reason = uapi.KVM_EXIT_IO
        io = self.run.exit.io
        io.direction, io.port, io.size, io.count, io.data_offset = direction, port, size, count, 4096
        ctypes.memmove(self.run_address + 4096, data, len(data))

    def data(self, n: int) -> bytes:
        return ctypes.string_at(self.run_address + 4096, n)


def test_io_exit_out_and_in() -> None:
    ports = pc_ports()
    vcpu = FakeVcpu()
    vcpu.exit_io(uapi.KVM_EXIT_IO_OUT, COM1_PORT, 1, b"A")
    ports.bus.handle_io_exit(vcpu)  # type: ignore[arg-type]
    vcpu.exit_io(uapi.KVM_EXIT_IO_IN, COM1_PORT + LSR, 1)
    ports.bus.handle_io_exit(vcpu)  # type: ignore[arg-type]
    assert vcpu.data(1) == b"\x60"
    vcpu.exit_io(uapi.KVM_EXIT_IO_IN, 0xCF8, 4)
    ports.bus.handle_io_exit(vcpu)  # type: ignore[arg-type]
    assert vcpu.data(4) == b"\xff" * 4  # no PCI here
    assert ports.uart.output == b"A"
    assert ports.bus.stats()["exits"] == {"out": 1, "in": 2}


def test_string_io_serves_every_element() -> None:
    ports = pc_ports()
    vcpu = FakeVcpu()
    vcpu.exit_io(uapi.KVM_EXIT_IO_OUT, COM1_PORT, 1, b"rep outsb\n", count=10)  # rep outsb
    ports.bus.handle_io_exit(vcpu)  # type: ignore[arg-type]
    assert ports.uart.output == b"rep outsb\n"
    ports.uart.feed(b"wxyz")
    vcpu.exit_io(uapi.KVM_EXIT_IO_IN, COM1_PORT, 1, count=5)  # rep insb, one more than queued
    ports.bus.handle_io_exit(vcpu)  # type: ignore[arg-type]
    assert vcpu.data(5) == b"wxyz\x00"
    vcpu.exit_io(uapi.KVM_EXIT_IO_OUT, 0x80, 2, b"\x01\x02\x03\x04", count=2)  # rep outsw
    ports.bus.handle_io_exit(vcpu)  # type: ignore[arg-type]
    assert ports.open_bus.writes[0x80] == 2 and ports.open_bus.writes[0x81] == 2
    assert ports.open_bus.last_post_code == 0x03


@pytest.mark.parametrize(("size", "count"), [(3, 1), (1, 0), (4, 1025)])
def test_impossible_io_exits_are_errors(size: int, count: int) -> None:
    vcpu = FakeVcpu()
    vcpu.exit_io(uapi.KVM_EXIT_IO_IN, 0x60, size, count=count)
    with pytest.raises(PortBusError, match="KVM_EXIT_IO at port 0x60"):
        pc_ports().bus.handle_io_exit(vcpu)  # type: ignore[arg-type]


# ---- the console log ---------------------------------------------------------------------


def test_console_log_appends_what_the_uart_sends(tmp_path: Path) -> None:
    path = console_log_path(tmp_path, "vm1")
    assert path == tmp_path / "console" / "vm1.log"
    with ConsoleLog(path) as log:
        uart = Uart8250(sink=log.write)
        for byte in b"first\n":
            wr(uart, THR, byte)
        assert path.read_bytes() == b"first\n"  # unbuffered: there as soon as it is sent
    with ConsoleLog(path) as log:  # a VM that comes back (a migration back here) appends
        log.write(b"second\n")
    assert path.read_bytes() == b"first\nsecond\n"
