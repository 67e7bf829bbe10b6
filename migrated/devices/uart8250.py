"""An 8250/16550A UART, as seen from its eight I/O ports (pure Python; no KVM, no files).

Registers by offset from the base port (DLAB is LCR bit 7):

    0  read: RBR (receive buffer)      write: THR (transmit)        DLAB=1: DLL
    1  IER (interrupt enable)                                        DLAB=1: DLM
    2  read: IIR (interrupt identity)  write: FCR (FIFO control)
    3  LCR (line control)     4  MCR (modem control)     5  LSR (line status)
    6  MSR (modem status)     7  SCR (scratch)

Transmission is instantaneous: a byte written to THR is appended at once to the output (a bounded
buffer of the most recent bytes, and the optional sink, e.g. the VM's console log), so LSR always
reports THR empty and transmitter empty and a polling guest never waits. Bytes given to `feed()`
arrive in the receive FIFO. Loopback (MCR bit 4) routes THR into the receive FIFO and the MCR
outputs into MSR, as the Linux 8250 driver's probe expects. There is no interrupt line yet:
`interrupt_pending` says whether the chip would raise one (IIR is kept exact for polling guests).

`to_wire()` / `from_wire()` carry the registers, the receive FIFO and the output buffer, so the
UART migrates with its VM and the target's console shows what the source's showed.

Thread safety: one lock; `io()` runs on vCPU threads, `read_output()` on the daemon's.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

REGISTERS = 8
WIRE_VERSION = 1
# The console shows the recent past, not the whole history: the per-VM log (the sink) keeps
# everything. 64 KiB is ~800 lines of 80 columns, and small enough to migrate with the VM.
OUTPUT_BYTES = 64 << 10
# What a guest has not read yet; a 16550A holds 16, the rest stands for a line being typed.
RX_BYTES = 4096

# LSR bits
LSR_DR = 0x01  # data ready
LSR_THRE = 0x20  # transmit holding register empty
LSR_TEMT = 0x40  # transmitter empty
# IER bits
IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmit holding register empty
IER_MASK = 0x0F
# IIR values
IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_ENABLED = 0xC0
# FCR bits
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_KEPT = 0xC9  # enable, DMA mode, trigger level: what a 16550A remembers
# LCR / MCR
LCR_DLAB = 0x80
MCR_LOOP = 0x10
MCR_MASK = 0x1F
# MSR: DCD | DSR | CTS, a modem that is always there (as QEMU's 8250 answers)
MSR_CONNECTED = 0xB0

Sink = Callable[[bytes], None]

_REGISTER_KEYS = ("ier", "lcr", "mcr", "fcr", "scr", "dll", "dlm")


class UartStateError(ValueError):
    """A serialized UART state that is malformed; the message names the field."""


class Uart8250:
    def __init__(self, sink: Sink | None = None, output_bytes: int = OUTPUT_BYTES) -> None:
        if output_bytes <= 0:
            raise ValueError(f"output buffer of {output_bytes} bytes: must be positive")
        self._lock = threading.Lock()
        self._sink = sink
        self.sink_error: str | None = None
        self.output_limit = output_bytes
        self._output = bytearray()
        self._output_total = 0  # bytes ever transmitted, including those dropped from the buffer
        self._rx: deque[int] = deque()
        self.rx_dropped = 0
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = 0x08  # OUT2
        self.fcr = 0
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        # The THR-empty interrupt is an event: raised when THR empties (or IER enables it), it is
        # cleared by reading IIR while it is the reported source, or by writing THR.
        self._thre_pending = False

    # ---- the guest's side ----------------------------------------------------------------

    def io(self, offset: int, is_write: bool, data: bytes) -> bytes:
        """One port access at `offset` (0-7). A wider access (`len(data)` > 1) touches the
        following registers one byte each, as the ISA bus splits it. Returns the bytes read
        (for a write, b"")."""
        if not 0 <= offset or offset + len(data) > REGISTERS:
            raise ValueError(f"UART access at offset {offset} of {len(data)} byte(s): registers are 0-7")
        with self._lock:
            if is_write:
                for i, value in enumerate(data):
                    self._write(offset + i, value)
                return b""
            return bytes(self._read(offset + i) for i in range(len(data)))

    def _read(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == 0:
            if dlab:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if reg == 1:
            return self.dlm if dlab else self.ier
        if reg == 2:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self._thre_pending = False
            return iir
        if reg == 3:
            return self.lcr
        if reg == 4:
            return self.mcr
        if reg == 5:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if reg == 6:
            return self._msr()
        return self.scr

    def _write(self, reg: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if reg == 0:
            if dlab:
                self.dll = value
            else:
                self._transmit(value)
        elif reg == 1:
            if dlab:
                self.dlm = value
            else:
                enabling_thri = value & IER_THRI and not self.ier & IER_THRI
                self.ier = value & IER_MASK
                if enabling_thri:
                    self._thre_pending = True  # THR is empty: the 16550A raises at once
        elif reg == 2:
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self.fcr = value & FCR_KEPT
        elif reg == 3:
            self.lcr = value
        elif reg == 4:
            self.mcr = value & MCR_MASK
        elif reg == 7:
            self.scr = value
        # LSR and MSR are read-only: writes are ignored (factory test registers on real chips).

    def _transmit(self, value: int) -> None:
        self._thre_pending = True  # empties again at once
        if self.mcr & MCR_LOOP:
            self._receive(value)
            return
        self._output.append(value)
        self._output_total += 1
        if len(self._output) > self.output_limit:
            del self._output[: len(self._output) - self.output_limit]
        if self._sink is not None:
            try:
                self._sink(bytes((value,)))
            except Exception as err:  # a full disk must not stop the guest: drop the sink
                self.sink_error = f"{type(err).__name__}: {err}"
                self._sink = None

    def _receive(self, value: int) -> None:
        if len(self._rx) >= RX_BYTES:
            self.rx_dropped += 1
            return
        self._rx.append(value)

    def _iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
        if self.ier & IER_RDI and self._rx:
            return fifo | IIR_RDI
        if self.ier & IER_THRI and self._thre_pending:
            return fifo | IIR_THRI
        return fifo | IIR_NO_INT

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            # DTR -> DSR, RTS -> CTS, OUT1 -> RI, OUT2 -> DCD
            return (m & 0x01) << 5 | (m & 0x02) << 3 | (m & 0x04) << 4 | (m & 0x08) << 4
        return MSR_CONNECTED

    @property
    def interrupt_pending(self) -> bool:
        """Whether the chip would assert its interrupt line (with OUT2 gating it on a PC)."""
        with self._lock:
            return self._iir() & IIR_NO_INT == 0

    # ---- the host's side -----------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Bytes arriving on the line (console input); returns how many fit in the FIFO."""
        with self._lock:
            before = self.rx_dropped
            for value in data:
                self._receive(value)
            return len(data) - (self.rx_dropped - before)

    def read_output(self, since: int = 0) -> tuple[bytes, int]:
        """Output transmitted after position `since` (a byte count from the start), as far as the
        buffer still holds it, and the position to ask from next time. `since=0`: all of it."""
        with self._lock:
            total = self._output_total
            start = max(since, total - len(self._output))
            if start >= total:
                return b"", total
            return bytes(self._output[len(self._output) - (total - start) :]), total

    @property
    def output(self) -> bytes:
        return self.read_output()[0]

    @property
    def output_total(self) -> int:
        with self._lock:
            return self._output_total

    def set_sink(self, sink: Sink | None) -> None:
        with self._lock:
            self._sink = sink
            self.sink_error = None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "bytes_transmitted": self._output_total,
                "bytes_buffered": len(self._output),
                "rx_pending": len(self._rx),
                "rx_dropped": self.rx_dropped,
                "sink_error": self.sink_error,
            }

    # ---- state ---------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """The UART's state as a msgpack-able dict (str keys; int, bool and bytes values)."""
        with self._lock:
            wire: dict[str, Any] = {"version": WIRE_VERSION}
            for key in _REGISTER_KEYS:
                wire[key] = getattr(self, key)
            wire["thre_pending"] = self._thre_pending
            wire["rx"] = bytes(self._rx)
            wire["output"] = bytes(self._output)
            wire["output_total"] = self._output_total
            return wire

    def load_wire(self, wire: object) -> None:
        """Replace this UART's state by `wire` (from `to_wire`), all checked before any change.
        The sink stays: it belongs to the host, not to the state."""
        m = _mapping(wire)
        values = {key: _byte(m, key) for key in _REGISTER_KEYS}
        thre = m["thre_pending"]
        if not isinstance(thre, bool):
            raise UartStateError(f"uart.thre_pending: a bool, got {type(thre).__name__}")
        rx = _bytes(m, "rx", RX_BYTES)
        output = _bytes(m, "output", OUTPUT_BYTES)
        total = m["output_total"]
        if isinstance(total, bool) or not isinstance(total, int) or not len(output) <= total < 1 << 63:
            raise UartStateError(f"uart.output_total {total!r}: an integer from len(output) = {len(output)} up")
        with self._lock:
            for key, value in values.items():
                setattr(self, key, value)
            self.ier &= IER_MASK
            self.mcr &= MCR_MASK
            self.fcr &= FCR_KEPT
            self._thre_pending = thre
            self._rx = deque(rx)
            keep = output[-self.output_limit :]
            self._output = bytearray(keep)
            self._output_total = total

    @classmethod
    def from_wire(cls, wire: object, sink: Sink | None = None) -> Uart8250:
        uart = cls(sink=sink)
        uart.load_wire(wire)
        return uart


_WIRE_KEYS = frozenset({"version", *_REGISTER_KEYS, "thre_pending", "rx", "output", "output_total"})


def _mapping(wire: object) -> Mapping[str, Any]:
    if not isinstance(wire, Mapping):
        raise UartStateError(f"uart: a map, got {type(wire).__name__}")
    keys = set(wire)
    if keys != _WIRE_KEYS:
        missing, extra = sorted(_WIRE_KEYS - keys, key=str), sorted(keys - _WIRE_KEYS, key=str)
        raise UartStateError(f"uart: missing keys {missing}, unknown keys {extra}")
    if wire["version"] != WIRE_VERSION:
        raise UartStateError(f"uart.version {wire['version']!r}: this daemon reads version {WIRE_VERSION}")
    return wire


def _byte(m: Mapping[str, Any], key: str) -> int:
    value = m[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise UartStateError(f"uart.{key} {value!r}: an integer from 0 to 255")
    return value


def _bytes(m: Mapping[str, Any], key: str, limit: int) -> bytes:
    value = m[key]
    if not isinstance(value, bytes):
        raise UartStateError(f"uart.{key}: bytes, got {type(value).__name__}")
    if len(value) > limit:
        raise UartStateError(f"uart.{key}: {len(value)} bytes, at most {limit}")
    return value
