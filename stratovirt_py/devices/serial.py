"""8250/16550A UART at 0x3F8 (IRQ 4): the guest's console.

The guest writes bytes to THR; they go to the output backend at once.  Input from
the host is queued in a receive FIFO and announced with the RDA interrupt.  The
interrupt line is level-driven (raised while an enabled condition is pending),
which gives the edge the IOAPIC/PIC expect for an ISA IRQ.
"""

from __future__ import annotations

import threading
from collections import deque
from ..logs import get_logger
from ..record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Callable, ClassVar, Optional

from ..errors import SnapshotError

log = get_logger(__name__)

DATA, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDA, IER_THRE, IER_RLS, IER_MSI = 1, 2, 4, 8
IIR_NONE, IIR_THRE, IIR_RDA = 0x01, 0x02, 0x04
IIR_FIFO_ENABLED = 0xC0
LCR_DLAB = 0x80
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 16
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
RX_FIFO_MAX = 4096


@record(frozen=True)
class SerialState:
    VERSION: ClassVar[int] = 1
    ier: int = 0
    lcr: int = 0x03
    mcr: int = MCR_OUT2
    fcr: int = 0
    scr: int = 0
    dll: int = 0x0C
    dlh: int = 0
    thre_pending: bool = False
    rx: bytes = b""

    FIELDS: ClassVar[dict] = {
        "ier": ("int", 0, 0x0F), "lcr": ("int", 0, 0xFF), "mcr": ("int", 0, 0x1F),
        "fcr": ("int", 0, 0xFF), "scr": ("int", 0, 0xFF), "dll": ("int", 0, 0xFF),
        "dlh": ("int", 0, 0xFF), "thre_pending": ("bool",), "rx": ("bytes", RX_FIFO_MAX)}


class Serial:
    def __init__(self, output: Callable[[bytes], None], set_irq: Callable[[int], None]):
        self._output = output
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self._rx: deque = deque()
        self._irq_level = 0
        self._load(SerialState())

    def _load(self, s: SerialState) -> None:
        self.ier, self.lcr, self.mcr, self.fcr, self.scr = s.ier, s.lcr, s.mcr, s.fcr, s.scr
        self.dll, self.dlh, self.thre_pending = s.dll, s.dlh, s.thre_pending
        self._rx = deque(s.rx)

    # -- host side ---------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> None:
        with self._lock:
            room = RX_FIFO_MAX - len(self._rx)
            self._rx.extend(data[:max(room, 0)])
            self._update_irq()

    # -- guest side (vCPU threads) --------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read_reg(offset & 7)
            self._update_irq()
        return bytes([value]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        out = None
        with self._lock:
            out = self._write_reg(offset & 7, data[0] if data else 0)
            self._update_irq()
        if out is not None:
            try:
                self._output(out)
            except OSError as e:
                log.debug("serial output dropped: %s", e)

    def _read_reg(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == DATA:
            if dlab:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if reg == IER:
            return self.dlh if dlab else self.ier
        if reg == IIR_FCR:
            fifo = IIR_FIFO_ENABLED if self.fcr & 1 else 0
            if self.ier & IER_RDA and self._rx:
                return IIR_RDA | fifo
            if self.ier & IER_THRE and self.thre_pending:
                self.thre_pending = False
                return IIR_THRE | fifo
            return IIR_NONE | fifo
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if reg == MSR:
            if self.mcr & MCR_LOOP:
                m = self.mcr
                return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0) |
                        (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
            return MSR_DCD | MSR_DSR | MSR_CTS
        return self.scr

    def _write_reg(self, reg: int, value: int) -> Optional[bytes]:
        dlab = self.lcr & LCR_DLAB
        if reg == DATA:
            if dlab:
                self.dll = value
                return None
            self.thre_pending = True
            if self.mcr & MCR_LOOP:
                if len(self._rx) < RX_FIFO_MAX:
                    self._rx.append(value)
                return None
            return bytes([value])
        if reg == IER:
            if dlab:
                self.dlh = value
            else:
                if value & IER_THRE and not self.ier & IER_THRE:
                    self.thre_pending = True
                self.ier = value & 0x0F
        elif reg == IIR_FCR:
            self.fcr = value
            if value & 0x02:
                self._rx.clear()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
        elif reg == SCR:
            self.scr = value
        return None

    def _update_irq(self) -> None:
        pending = bool((self.ier & IER_RDA and self._rx) or (self.ier & IER_THRE and self.thre_pending))
        level = 1 if pending else 0
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)

    # -- persist -----------------------------------------------------------------------
    def save(self) -> SerialState:
        with self._lock:
            return SerialState(ier=self.ier, lcr=self.lcr, mcr=self.mcr, fcr=self.fcr, scr=self.scr,
                               dll=self.dll, dlh=self.dlh, thre_pending=self.thre_pending,
                               rx=bytes(self._rx))

    def restore(self, state: SerialState) -> None:
        if len(state.rx) > RX_FIFO_MAX:
            raise SnapshotError("serial state holds more input than the FIFO can")
        with self._lock:
            self._load(state)
            self._irq_level = 0
            self._update_irq()
