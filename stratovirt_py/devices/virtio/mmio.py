"""virtio-mmio transport, version 2 (virtio 1.x "Virtio Over MMIO"; no legacy layout).

One ``MmioTransport`` per 0x200-byte slot; it is the bus device.  Registers (32-bit):

    0x000 MagicValue "virt"       0x050 QueueNotify (w)          0x090/0x094 QueueDriver lo/hi
    0x004 Version = 2             0x060 InterruptStatus (r)      0x0a0/0x0a4 QueueDevice lo/hi
    0x008 DeviceID                0x064 InterruptACK (w)         0x0ac SHMSel, 0x0b0.. SHM len/base
    0x00c VendorID                0x070 Status                   0x0fc ConfigGeneration (r)
    0x010/0x014 DeviceFeatures/Sel                               0x100.. device config space
    0x020/0x024 DriverFeatures/Sel
    0x030 QueueSel, 0x034 QueueNumMax, 0x038 QueueNum, 0x044 QueueReady
    0x080/0x084 QueueDesc lo/hi

VendorID is 0x4D564B53 ("SKVM" read as little-endian bytes); Linux ignores it.

Threads: ``read``/``write`` run on vCPU threads, are quick and never raise.  A kick is
a write of the queue index to QueueNotify; the machine turns it into an eventfd signal
(``ioeventfds()``: KVM ioeventfd on ``base + 0x50`` with datamatch = index) so it never
reaches Python on the vCPU thread.  The eventfds are read on the I/O thread, which runs
the device's ``process_queue``.  A QueueNotify write that does reach ``write()`` signals
the same eventfd (or, without an I/O thread, e.g. in tests, processes the queue inline).

Interrupts: ``irq.trigger()`` is called whenever a bit is set in InterruptStatus (bit 0
used buffer, bit 1 configuration change); InterruptACK clears bits.  The machine passes an
``EventFdIrq`` over a KVM irqfd.

Guest errors: a ``QueueError`` from the device (bad ring, bad descriptor) logs one line,
sets DEVICE_NEEDS_RESET in Status and raises a configuration-change interrupt.  The device
then ignores its queues until the driver resets it (writes 0 to Status).
"""

from __future__ import annotations

import os
import struct
import threading
from ...logs import get_logger
from ...record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Callable, ClassVar, List, Optional, Set, Tuple

from ...errors import U32, U64, SnapshotError, check_fields
from ...memory import GuestMemory
from ..iothread import IoThread
from .device import (INT_CONFIG_CHANGE, INT_USED_BUFFER, STATUS_ACKNOWLEDGE,
                     STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
                     STATUS_FAILED, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
                     VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, bit)
from .queue import Queue, QueueError, QueueState

log = get_logger(__name__)

MMIO_SLOT_SIZE = 0x200
MAGIC_VALUE = 0x74726976
MMIO_VERSION = 2
VENDOR_ID = 0x4D564B53

REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_SHM_BASE_LOW = 0x0B8
REG_SHM_BASE_HIGH = 0x0BC
REG_CONFIG_GENERATION = 0x0FC
CONFIG_SPACE = 0x100

_QUEUE_ADDR_REGS = {
    REG_QUEUE_DESC_LOW: ("desc_table", 0), REG_QUEUE_DESC_HIGH: ("desc_table", 32),
    REG_QUEUE_DRIVER_LOW: ("avail_ring", 0), REG_QUEUE_DRIVER_HIGH: ("avail_ring", 32),
    REG_QUEUE_DEVICE_LOW: ("used_ring", 0), REG_QUEUE_DEVICE_HIGH: ("used_ring", 32),
}


# -- interrupt lines ------------------------------------------------------------------
class EventFdIrq:
    """An interrupt line backed by an eventfd (a KVM irqfd: writing it injects the GSI)."""

    def __init__(self, fd: int):
        self.fd = fd

    def trigger(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except OSError as e:  # counter saturated or fd gone: nothing better to do
            log.warning("irqfd %d: %s", self.fd, e)


class CountingIrq:
    """Counts triggers (tests)."""

    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def trigger(self) -> None:
        self.count += 1
        self.event.set()


# -- persist --------------------------------------------------------------------------
@record(frozen=True)
class MmioTransportState:
    VERSION: ClassVar[int] = 1
    device_id: int
    device_features: int
    acked_features: int
    device_features_sel: int
    driver_features_sel: int
    queue_sel: int
    status: int
    interrupt_status: int
    config_generation: int
    queues: List[QueueState] = field(default_factory=list)

    FIELDS: ClassVar[dict] = {
        "device_id": ("int", 0, U32), "device_features": ("int", 0, U64),
        "acked_features": ("int", 0, U64), "device_features_sel": ("int", 0, U32),
        "driver_features_sel": ("int", 0, U32), "queue_sel": ("int", 0, U32),
        "status": ("int", 0, 0xFF), "interrupt_status": ("int", 0, U32),
        "config_generation": ("int", 0, U32), "queues": ("list", 64)}

    @classmethod
    def check(cls, section: str, data: dict, prefix: str) -> None:
        check_fields(section, data, cls.FIELDS, prefix)
        for i, q in enumerate(data["queues"]):
            check_fields(section, q, QueueState.FIELDS, f"{prefix}queues[{i}].")

    @classmethod
    def from_dict(cls, d: dict) -> "MmioTransportState":
        d = dict(d)
        d["queues"] = [q if isinstance(q, QueueState) else QueueState(**q) for q in d["queues"]]
        return cls(**d)


class MmioTransport:
    """The bus device for one virtio-mmio slot, wrapping one ``VirtioDevice``."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq,
                 iothread: Optional[IoThread] = None):
        self.device = device
        self.mem = mem
        self.irq = irq
        self.iothread = iothread
        self.queues = [Queue(mem, n) for n in device.QUEUE_SIZES]
        self._lock = threading.RLock()      # device state: registers vs. I/O thread work
        self._irq_lock = threading.Lock()   # InterruptStatus only
        self._paused = False
        self._pending_kicks: Set[int] = set()
        self._eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in self.queues]
        self._reset_registers()
        self.config_generation = 0
        device.transport = self
        if iothread is not None:
            for i, fd in enumerate(self._eventfds):
                iothread.register(fd, self._make_kick_handler(i, fd))
            device.attach(iothread)

    @property
    def name(self) -> str:
        return self.device.id

    def _reset_registers(self) -> None:
        self.status = 0
        self.acked_features = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        for q in self.queues:
            q.reset()

    # -- wiring -------------------------------------------------------------------------
    def ioeventfds(self) -> List[Tuple[int, int, int]]:
        """(mmio offset, datamatch, eventfd) per queue, for KVM_IOEVENTFD on base + offset."""
        return [(REG_QUEUE_NOTIFY, i, fd) for i, fd in enumerate(self._eventfds)]

    def _make_kick_handler(self, index: int, fd: int) -> Callable[[], None]:
        def on_kick() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            self.process_queue(index)
        return on_kick

    def close(self) -> None:
        if self.iothread is not None:
            for fd in self._eventfds:
                self.iothread.unregister(fd)
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []
        self.device.close()

    # -- features -----------------------------------------------------------------------
    @property
    def device_features(self) -> int:
        return self.device.features() | bit(VIRTIO_F_VERSION_1)

    def has_feature(self, n: int) -> bool:
        return bool(self.acked_features & bit(n))

    # -- bus device: reads ------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        try:
            if offset >= CONFIG_SPACE:
                if size not in (1, 2, 4, 8):
                    return bytes(size)
                return self.device.read_config(offset - CONFIG_SPACE, size)
            if size != 4 or offset % 4:
                log.debug("%s: ignored %d-byte read at %#x", self.name, size, offset)
                return bytes(size)
            return struct.pack("<I", self._read_reg(offset) & 0xFFFF_FFFF)
        except Exception:
            log.exception("%s: read at %#x failed", self.name, offset)
            return bytes(size)

    def _read_reg(self, offset: int) -> int:
        if offset == REG_MAGIC:
            return MAGIC_VALUE
        if offset == REG_VERSION:
            return MMIO_VERSION
        if offset == REG_DEVICE_ID:
            return self.device.DEVICE_ID
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self.device_features >> (32 * self.device_features_sel)
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        q = self._selected_queue()
        if offset == REG_QUEUE_NUM_MAX:
            return q.max_size if q is not None else 0
        if offset == REG_QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == REG_QUEUE_NUM:
            return q.size if q is not None else 0
        if offset in _QUEUE_ADDR_REGS and q is not None:
            attr, shift = _QUEUE_ADDR_REGS[offset]
            return getattr(q, attr) >> shift
        return 0

    def _selected_queue(self) -> Optional[Queue]:
        if self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        return None

    # -- bus device: writes -----------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        try:
            if offset >= CONFIG_SPACE:
                if len(data) in (1, 2, 4, 8):
                    with self._lock:
                        self.device.write_config(offset - CONFIG_SPACE, bytes(data))
                return
            if len(data) != 4 or offset % 4:
                log.debug("%s: ignored %d-byte write at %#x", self.name, len(data), offset)
                return
            value = struct.unpack("<I", data)[0]
            if offset == REG_QUEUE_NOTIFY:
                self.notify(value)
                return
            if offset == REG_INTERRUPT_ACK:
                with self._irq_lock:
                    self.interrupt_status &= ~value
                return
            with self._lock:
                self._write_reg(offset, value)
        except Exception:
            log.exception("%s: write at %#x failed", self.name, offset)

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            if self.status & STATUS_FEATURES_OK or not self.status & STATUS_DRIVER:
                log.debug("%s: DriverFeatures written in status %#x, ignored", self.name, self.status)
            elif self.driver_features_sel <= 1:
                shift = 32 * self.driver_features_sel
                self.acked_features = (self.acked_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_STATUS:
            self._write_status(value)
        elif offset == REG_SHM_SEL:
            pass
        elif offset in (REG_QUEUE_NUM, REG_QUEUE_READY) or offset in _QUEUE_ADDR_REGS:
            self._write_queue_reg(offset, value)
        else:
            log.debug("%s: write to read-only/unknown register %#x ignored", self.name, offset)

    def _write_queue_reg(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            log.debug("%s: queue register %#x for absent queue %d", self.name, offset, self.queue_sel)
            return
        if offset == REG_QUEUE_READY:
            if value == 1 and not q.ready:
                try:
                    q.validate()
                except QueueError as e:
                    self._needs_reset(f"queue {self.queue_sel}: {e}")
                    return
                q.ready = True
            elif value == 0:
                q.ready = False
            return
        if q.ready:
            log.debug("%s: queue %d register %#x written while ready, ignored",
                      self.name, self.queue_sel, offset)
            return
        if offset == REG_QUEUE_NUM:
            q.size = value  # checked when the driver sets QueueReady
        else:
            attr, shift = _QUEUE_ADDR_REGS[offset]
            old = getattr(q, attr)
            setattr(q, attr, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        new = (value & ~STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET)
        if new & old != old:
            log.debug("%s: status %#x -> %#x clears bits, ignored", self.name, old, value)
            return
        added = new & ~old
        if added & STATUS_DRIVER and not new & STATUS_ACKNOWLEDGE:
            return
        if added & STATUS_FEATURES_OK:
            if not new & STATUS_DRIVER:
                return
            offered = self.device_features
            if not self.acked_features & bit(VIRTIO_F_VERSION_1) or self.acked_features & ~offered:
                log.info("%s: driver features %#x refused (offered %#x, VERSION_1 required)",
                         self.name, self.acked_features, offered)
                new &= ~STATUS_FEATURES_OK
        if added & STATUS_DRIVER_OK:
            if not new & STATUS_FEATURES_OK:
                log.info("%s: DRIVER_OK without FEATURES_OK, ignored", self.name)
                return
            self.status = new
            self._activate()
            return
        self.status = new

    def _activate(self) -> None:
        for q in self.queues:
            q.event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX)
            q.indirect = self.has_feature(VIRTIO_RING_F_INDIRECT_DESC)
        try:
            self.device.activate(self.queues)
        except Exception as e:
            self._needs_reset(f"activation failed: {e}")
            return
        # The driver may have queued buffers (and kicked) before DRIVER_OK.
        self._schedule_all_queues()

    def reset(self) -> None:
        """Device reset (driver wrote 0 to Status, or a machine reset)."""
        with self._lock:
            self.device.reset()
            self._reset_registers()
            self._pending_kicks.clear()

    # -- kicks and device work (I/O thread) ----------------------------------------------
    def notify(self, index: int) -> None:
        """A QueueNotify write that reached Python: do what the ioeventfd would do."""
        if index >= len(self.queues):
            log.debug("%s: notify for absent queue %d", self.name, index)
            return
        # Queued on the I/O thread in order with its other work (so IoThread.sync()
        # sees it done), as a kick through the ioeventfd would be processed there.
        self._schedule(index)

    @property
    def active(self) -> bool:
        s = self.status
        return bool(s & STATUS_DRIVER_OK) and not s & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)

    def process_queue(self, index: int) -> None:
        """Run the device for one queue (I/O thread); never raises."""
        with self._lock:
            if self._paused:
                self._pending_kicks.add(index)
                return
            if not self.active or not self.queues[index].ready:
                return
            self._guarded(lambda: self.device.process_queue(index), f"queue {index}")

    def run_device_work(self, fn: Callable[[], None]) -> None:
        """Run device work not caused by a kick (backend input, timers); never raises."""
        with self._lock:
            if self._paused or not self.active:
                return
            self._guarded(fn, "device")

    def _guarded(self, fn: Callable[[], None], what: str) -> None:
        try:
            fn()
        except QueueError as e:
            self._needs_reset(f"{what}: {e}")
        except Exception as e:  # a device bug: same containment, with a traceback
            log.exception("%s: %s failed", self.name, what)
            self._needs_reset(f"{what}: internal error {e!r}")

    def _needs_reset(self, why: str) -> None:
        log.error("%s: device needs reset: %s", self.name, why)
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self._raise_interrupt(INT_CONFIG_CHANGE)

    def _schedule_all_queues(self) -> None:
        for i, q in enumerate(self.queues):
            if q.ready:
                self._schedule(i)

    def _schedule(self, index: int) -> None:
        if self.iothread is not None:
            self.iothread.call_soon(lambda: self.process_queue(index))
        else:
            self.process_queue(index)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run device work later (throttling); on the I/O thread when there is one."""
        def run() -> None:
            self.run_device_work(fn)
        if self.iothread is not None:
            self.iothread.call_later(delay, run)
        else:
            t = threading.Timer(delay, run)
            t.daemon = True
            t.start()

    # -- interrupts -------------------------------------------------------------------------
    def signal_used(self, index: int) -> None:
        if self.queues[index].needs_notification():
            self._raise_interrupt(INT_USED_BUFFER)

    def replace_backend(self, backend) -> None:
        """Hot-replace: the device swaps its backend under the transport lock (never while
        it is processing a queue), then the driver is told its configuration changed."""
        with self._lock:
            self.device.replace_backend(backend)
        self.config_changed()

    def config_changed(self) -> None:
        """The device changed its configuration space."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            if self.status & STATUS_DRIVER_OK:
                self._raise_interrupt(INT_CONFIG_CHANGE)

    def _raise_interrupt(self, bits: int) -> None:
        with self._irq_lock:
            self.interrupt_status |= bits
        self.irq.trigger()

    # -- snapshot ---------------------------------------------------------------------------
    def drain(self) -> None:
        """Stop device work (kicks are remembered), wait for in-flight work, flush backends.

        Call with the vCPUs paused, before saving guest memory and device state.
        """
        with self._lock:
            self._paused = True
            self.device.drain()

    def resume(self) -> None:
        """Undo ``drain()``: process the kicks that arrived meanwhile."""
        with self._lock:
            self._paused = False
            self._pending_kicks.clear()
        if self.active:
            self._schedule_all_queues()

    def save(self) -> MmioTransportState:
        with self._lock:
            return MmioTransportState(
                device_id=self.device.DEVICE_ID, device_features=self.device_features,
                acked_features=self.acked_features,
                device_features_sel=self.device_features_sel,
                driver_features_sel=self.driver_features_sel, queue_sel=self.queue_sel,
                status=self.status, interrupt_status=self.interrupt_status,
                config_generation=self.config_generation,
                queues=[q.save() for q in self.queues])

    def restore(self, state: MmioTransportState) -> None:
        """Restore registers and queues (strict); the device's own state is restored apart.

        Leaves the transport paused; call ``resume_after_restore()`` once everything
        (guest memory, device state, interrupt wiring) is in place.
        """
        if state.device_id != self.device.DEVICE_ID:
            raise SnapshotError(f"{self.name}: snapshot has virtio device type {state.device_id}, "
                                f"the configuration has {self.device.DEVICE_ID}")
        offered = self.device_features
        if state.acked_features & ~offered:
            raise SnapshotError(f"{self.name}: features {state.acked_features:#x} acked in the "
                                f"snapshot are not all offered by this device ({offered:#x})")
        if len(state.queues) != len(self.queues):
            raise SnapshotError(f"{self.name}: snapshot has {len(state.queues)} queues, "
                                f"the device has {len(self.queues)}")
        if not 0 <= state.status <= 0xFF or state.status & 0x30:
            raise SnapshotError(f"{self.name}: device status {state.status:#x} is invalid")
        with self._lock:
            self._paused = True
            self.device.reset()
            self._reset_registers()
            for q, qs in zip(self.queues, state.queues):
                q.restore(qs)
            self.acked_features = state.acked_features
            self.device_features_sel = state.device_features_sel
            self.driver_features_sel = state.driver_features_sel
            self.queue_sel = state.queue_sel
            self.status = state.status
            self.interrupt_status = state.interrupt_status & (INT_USED_BUFFER | INT_CONFIG_CHANGE)
            self.config_generation = state.config_generation
            if self.status & STATUS_DRIVER_OK:
                self.device.activate(self.queues)

    def resume_after_restore(self) -> None:
        """Start working on a restored device without waiting for a guest kick."""
        self.resume()
        if self.interrupt_status:
            self.irq.trigger()  # an interrupt may have been pending when the snapshot was taken
