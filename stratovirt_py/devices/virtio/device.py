"""What every virtio device shares: feature/status constants and the ``VirtioDevice`` base.

A device module (``blk.py``, ``rng.py``, ``console.py``) is laid out the same way:
constants, a frozen ``<Dev>State``, then the device class with, in order, its
constructor (opens the backend, raises ``DeviceError``), ``features()``, ``config()``,
``activate()``/``reset()``, ``process_queue()`` (runs on the I/O thread), then
``drain()``/``save()``/``restore()``/``close()``.

The transport (``mmio.py``) owns the queues, the feature negotiation and the interrupt;
it calls ``activate(queues)`` on DRIVER_OK, ``process_queue(i)`` for each kick (under
its lock, on the I/O thread) and ``reset()`` when the driver writes 0 to Status.  A
device signals used buffers with ``self.signal_used(i)`` and config changes with
``self.config_changed()``.  Guest mistakes raise ``QueueError``; the transport turns
them into DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import TYPE_CHECKING, Callable, ClassVar, List, Optional, Tuple

from ...logs import get_logger
from .queue import Queue

if TYPE_CHECKING:
    from .mmio import MmioTransport

log = get_logger(__name__)

# Device IDs (virtio 1.x, "Device Types").
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

# Device-independent feature bits.
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# Device status bits.
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# InterruptStatus bits.
INT_USED_BUFFER = 0x1
INT_CONFIG_CHANGE = 0x2


def bit(n: int) -> int:
    return 1 << n


COMMON_FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX)


class VirtioDevice:
    DEVICE_ID: ClassVar[int] = 0
    NAME: ClassVar[str] = "virtio"
    QUEUE_SIZES: ClassVar[Tuple[int, ...]] = ()

    def __init__(self, id: Optional[str] = None):
        self.id = id or self.NAME
        self.transport: Optional["MmioTransport"] = None
        self.queues: List[Queue] = []

    # -- what the transport asks ------------------------------------------------
    def attach(self, iothread) -> None:
        """Register backend fds (chardev sockets, ...) with the I/O thread."""

    def features(self) -> int:
        """Feature bits offered to the driver."""
        return COMMON_FEATURES

    def config(self) -> bytes:
        """The device-specific configuration space (little-endian layout from the spec)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        data = self.config()[offset:offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        log.debug("%s: ignored config write at %#x", self.id, offset)

    def activate(self, queues: List[Queue]) -> None:
        self.queues = queues

    def reset(self) -> None:
        self.queues = []

    def process_queue(self, index: int) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        """Finish in-flight work (called with the transport paused)."""

    def close(self) -> None:
        """Release host resources (files, sockets)."""

    # -- helpers for devices --------------------------------------------------------
    @property
    def acked_features(self) -> int:
        return self.transport.acked_features if self.transport is not None else 0

    def signal_used(self, index: int) -> None:
        if self.transport is not None:
            self.transport.signal_used(index)

    def config_changed(self) -> None:
        if self.transport is not None:
            self.transport.config_changed()

    def run_on_device(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` under the transport's lock and error handling (backend events)."""
        if self.transport is not None:
            self.transport.run_device_work(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        if self.transport is not None:
            self.transport.call_later(delay, fn)
