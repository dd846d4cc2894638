"""virtio-console (virtio 1.x "Console Device"): ``virtio-serial-device`` with one
``virtconsole`` port, no MULTIPORT.

Queues: 0 receiveq (device -> driver, device-writable buffers), 1 transmitq (driver ->
device, device-readable buffers).  Guest output goes to the chardev backend as it comes;
backend input is buffered (``pending_input``, bounded) and copied into receiveq buffers
as the driver provides them.  VIRTIO_CONSOLE_F_EMERG_WRITE is offered: a write to
``emerg_wr`` in config space outputs one byte.

Input that arrives while the device is not active (before DRIVER_OK, during a
snapshot) waits in ``pending_input`` and is part of the saved state.  Output is never
held back (the backend drops what it cannot take), so there is no pending output.
"""

from __future__ import annotations

import struct
import threading
from ...logs import get_logger
from ...record import record
from typing import ClassVar, Optional

from ...errors import SnapshotError
from ..chardev import CharBackend
from ..iothread import IoThread
from .device import COMMON_FEATURES, VIRTIO_ID_CONSOLE, VirtioDevice, bit

log = get_logger(__name__)

QUEUE_SIZE = 256
RX_QUEUE = 0
TX_QUEUE = 1
MAX_PENDING_INPUT = 1 << 20

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

EMERG_WR_OFFSET = 8


@record(frozen=True)
class ConsoleState:
    VERSION: ClassVar[int] = 1
    pending_input: bytes

    FIELDS: ClassVar[dict] = {"pending_input": ("bytes", MAX_PENDING_INPUT)}


class Console(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_CONSOLE
    NAME = "virtio-console"
    QUEUE_SIZES = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, backend: CharBackend, id: Optional[str] = None):
        super().__init__(id)
        self.backend = backend
        self._input = bytearray()
        self._input_lock = threading.Lock()
        backend.set_receiver(self.receive)

    def attach(self, iothread: IoThread) -> None:
        self.backend.attach(iothread)

    def features(self) -> int:
        return COMMON_FEATURES | bit(VIRTIO_CONSOLE_F_EMERG_WRITE)

    def config(self) -> bytes:
        """struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr."""
        return struct.pack("<HHII", 0, 0, 1, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR_OFFSET and self.acked_features & bit(VIRTIO_CONSOLE_F_EMERG_WRITE):
            self.backend.write(data[:1])

    # -- input (backend -> guest) -------------------------------------------------------
    @property
    def pending_input(self) -> bytes:
        with self._input_lock:
            return bytes(self._input)

    def receive(self, data: bytes) -> None:
        """Backend input (I/O thread): buffer it and hand it to the guest if it can take it."""
        with self._input_lock:
            room = MAX_PENDING_INPUT - len(self._input)
            if len(data) > room:
                log.warning("%s: guest is not reading its console; %d input bytes dropped",
                            self.id, len(data) - max(room, 0))
                data = data[:max(room, 0)]
            self._input += data
        self.run_on_device(self._flush_input)

    def _flush_input(self) -> None:
        if len(self.queues) <= RX_QUEUE:
            return
        q = self.queues[RX_QUEUE]
        added = 0
        try:
            while True:
                with self._input_lock:
                    while self._input and q.pending():
                        chain = q.pop()
                        n = chain.write(0, bytes(self._input[:chain.writable_len]))
                        del self._input[:n]
                        q.add_used(chain.head, n)
                        added += 1
                    if not self._input:
                        break
                if not q.enable_notification():
                    break
        finally:
            if added:
                self.signal_used(RX_QUEUE)

    # -- queues (I/O thread) --------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == RX_QUEUE:
            self._flush_input()
            return
        q = self.queues[index]
        added = 0
        try:
            while True:
                while q.pending():
                    chain = q.pop()
                    data = chain.read()
                    if data:
                        self.backend.write(data)
                    q.add_used(chain.head, 0)
                    added += 1
                if not q.enable_notification():
                    break
        finally:
            if added:
                self.signal_used(index)

    # -- snapshot ---------------------------------------------------------------------------
    def save(self) -> ConsoleState:
        return ConsoleState(pending_input=self.pending_input)

    def restore(self, state: ConsoleState) -> None:
        if not isinstance(state.pending_input, (bytes, bytearray)) or \
                len(state.pending_input) > MAX_PENDING_INPUT:
            raise SnapshotError(f"{self.id}: console input buffer in the snapshot is invalid")
        with self._input_lock:
            self._input = bytearray(state.pending_input)

    def close(self) -> None:
        self.backend.set_receiver(None)
        self.backend.close()
