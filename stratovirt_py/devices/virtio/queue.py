"""The device side of a split virtqueue (virtio 1.x, "Split Virtqueues"), strictly validated.

Layout in guest memory (all little-endian), for a queue of ``size`` entries:

    descriptor table  16 * size, 16-aligned   {le64 addr; le32 len; le16 flags; le16 next}
    available ring     6 + 2 * size, 2-aligned {le16 flags; le16 idx; le16 ring[size]; le16 used_event}
    used ring          6 + 8 * size, 4-aligned {le16 flags; le16 idx; {le32 id; le32 len} ring[size];
                                                le16 avail_event}

Everything the guest controls is checked, following rust-vmm's virtio-queue: the ring
addresses when the queue is made ready (``validate``), and for every chain: head and NEXT
indices in range, every buffer inside guest RAM, the number of steps bounded by the table
size (a loop is an error, not a hang), indirect tables only when negotiated, not nested,
a multiple of 16 bytes and inside RAM, total length < 2^32, device-readable buffers before
device-writable ones, and the driver's avail index never more than ``size`` ahead.  Any
violation raises ``QueueError``; the transport turns it into DEVICE_NEEDS_RESET.

Barriers: on x86 (TSO) loads are not reordered with loads nor stores with stores, so the
ring protocol needs only one full fence, between publishing avail_event and re-reading
avail idx (``enable_notification``).  Python has no fence primitive; acquiring a lock
executes a locked instruction, which is a full barrier on x86.
"""

from __future__ import annotations

import struct
import threading
from ...record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import ClassVar, List, Optional, Tuple
    Segment = Tuple[int, int]  # (guest address, length)

from ...errors import U64, SnapshotError
from ...memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768          # the spec's limit for split queues
MAX_CHAIN_BYTES = 1 << 32       # total length must stay below this

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")

_fence_lock = threading.Lock()


def _fence() -> None:
    with _fence_lock:
        pass


class QueueError(Exception):
    """The guest put something invalid in a virtqueue (never reaches the user as a VmmError)."""




def slice_segments(segments: List[Segment], offset: int, length: Optional[int]) -> List[Segment]:
    """The (addr, len) pieces covering bytes [offset, offset+length) of ``segments``."""
    out: List[Segment] = []
    remaining = length
    for addr, ln in segments:
        if remaining is not None and remaining <= 0:
            break
        if offset >= ln:
            offset -= ln
            continue
        take = ln - offset
        if remaining is not None:
            take = min(take, remaining)
            remaining -= take
        out.append((addr + offset, take))
        offset = 0
    return out


class DescriptorChain:
    """One validated chain: device-readable buffers, then device-writable buffers."""

    __slots__ = ("mem", "head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, mem: GuestMemory, head: int,
                 readable: List[Segment], writable: List[Segment],
                 readable_len: Optional[int] = None, writable_len: Optional[int] = None):
        self.mem = mem
        self.head = head
        self.readable = readable
        self.writable = writable
        # The parser knows the totals already; devices ask for them on every request.
        self.readable_len = sum(ln for _, ln in readable) if readable_len is None else readable_len
        self.writable_len = sum(ln for _, ln in writable) if writable_len is None else writable_len

    def read(self, offset: int = 0, length: Optional[int] = None) -> bytes:
        """Bytes of the device-readable part, from ``offset`` (all of it by default)."""
        return b"".join(self.mem.read(a, n) for a, n in slice_segments(self.readable, offset, length))

    def write(self, offset: int, data: bytes) -> int:
        """Copy ``data`` into the device-writable part at ``offset``; returns bytes written."""
        done = 0
        for addr, n in slice_segments(self.writable, offset, len(data)):
            self.mem.write(addr, data[done:done + n])
            done += n
        return done

    def readable_views(self, offset: int = 0, length: Optional[int] = None) -> List[memoryview]:
        return [self.mem.view(a, n) for a, n in slice_segments(self.readable, offset, length)]

    def writable_views(self, offset: int = 0, length: Optional[int] = None) -> List[memoryview]:
        return [self.mem.view(a, n) for a, n in slice_segments(self.writable, offset, length)]

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"


@record(frozen=True)
class QueueState:
    VERSION: ClassVar[int] = 1
    max_size: int
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    next_avail: int
    next_used: int
    event_idx: bool
    indirect: bool

    FIELDS: ClassVar[dict] = {
        "max_size": ("int", 0, 0x8000), "size": ("int", 0, 0x8000), "ready": ("bool",),
        "desc_table": ("int", 0, U64), "avail_ring": ("int", 0, U64), "used_ring": ("int", 0, U64),
        "next_avail": ("int", 0, 0xFFFF), "next_used": ("int", 0, 0xFFFF),
        "event_idx": ("bool",), "indirect": ("bool",)}


class Queue:
    """A split virtqueue as the device sees it.

    The transport sets ``size``, the three addresses and ``ready`` from guest register
    writes (lenient: stored as written, checked by ``validate()`` when the driver sets
    QueueReady), and ``event_idx``/``indirect`` from the negotiated features.
    """

    def __init__(self, mem: GuestMemory, max_size: int):
        if max_size < 1 or max_size > MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.mem = mem
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0
        self.event_idx = False
        self.indirect = False
        self.signalled_used: Optional[int] = None
        # Views of the three rings, made by validate(): no address lookups per access.
        self._desc_view: Optional[memoryview] = None
        self._avail_view: Optional[memoryview] = None
        self._used_view: Optional[memoryview] = None

    # -- validation -------------------------------------------------------------
    def validate(self) -> None:
        size = self.size
        if size < 1 or size > self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two <= {self.max_size}")
        for what, addr, align, length in (
                ("descriptor table", self.desc_table, 16, DESC_SIZE * size),
                ("available ring", self.avail_ring, 2, 6 + 2 * size),
                ("used ring", self.used_ring, 4, 6 + 8 * size)):
            if addr % align:
                raise QueueError(f"{what} address {addr:#x} is not {align}-byte aligned")
            if not self.mem.check(addr, length):
                raise QueueError(f"{what} {addr:#x}+{length:#x} is not in guest RAM")
        self._desc_view = self.mem.view(self.desc_table, DESC_SIZE * size)
        self._avail_view = self.mem.view(self.avail_ring, 6 + 2 * size)
        self._used_view = self.mem.view(self.used_ring, 6 + 8 * size)

    # -- available ring -----------------------------------------------------------
    def avail_idx(self) -> int:
        return _U16.unpack_from(self._avail_view, 2)[0]

    def pending(self) -> int:
        """How many chains the driver has made available that the device has not taken."""
        if not self.ready or self._avail_view is None:
            return 0
        n = (self.avail_idx() - self.next_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(f"available index runs {n} entries ahead of the device "
                             f"(queue size {self.size})")
        return n

    def pop(self) -> Optional[DescriptorChain]:
        """The next available chain, validated, or None when the ring is empty."""
        if self.pending() == 0:
            return None
        head = _U16.unpack_from(self._avail_view, 4 + 2 * (self.next_avail % self.size))[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self.parse_chain(head)

    def undo_pop(self) -> None:
        """Give back the chain the last ``pop()`` returned (e.g. throttled): it pops again."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def parse_chain(self, head: int) -> DescriptorChain:
        mem = self.mem
        if head >= self.size:
            raise QueueError(f"chain head {head} is out of range (queue size {self.size})")
        readable: List[Segment] = []
        writable: List[Segment] = []
        total = wtotal = 0
        table, count = self._desc_view, self.size
        in_indirect = False
        idx, steps = head, 0
        while True:
            if idx >= count:
                raise QueueError(f"descriptor index {idx} is out of range (table of {count})")
            steps += 1
            if steps > count:
                raise QueueError(f"descriptor chain from head {head} loops or is longer "
                                 f"than its table ({count})")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * idx)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise QueueError("indirect descriptor but VIRTIO_RING_F_INDIRECT_DESC "
                                     "was not negotiated")
                if in_indirect:
                    raise QueueError("nested indirect descriptor table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError("indirect descriptor with the NEXT flag")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > 65536:
                    raise QueueError(f"indirect descriptor table length {length} is invalid")
                if not mem.check(addr, length):
                    raise QueueError(f"indirect table {addr:#x}+{length:#x} is not in guest RAM")
                table, count = mem.view(addr, length), length // DESC_SIZE
                in_indirect = True
                idx, steps = 0, 0
                continue
            if not mem.check(addr, length):
                raise QueueError(f"buffer {addr:#x}+{length:#x} is not in guest RAM")
            total += length
            if total >= MAX_CHAIN_BYTES:
                raise QueueError("descriptor chain is 4 GiB or longer")
            if flags & VIRTQ_DESC_F_WRITE:
                if length:
                    writable.append((addr, length))
                    wtotal += length
            elif writable:
                raise QueueError("device-readable buffer after a device-writable one")
            elif length:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            idx = nxt
        return DescriptorChain(mem, head, readable, writable, total - wtotal, wtotal)

    # -- used ring --------------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        used = self._used_view
        if used is None:
            raise QueueError("used buffer on a queue that is not set up")
        _USED_ELEM.pack_into(used, 4 + 8 * (self.next_used % self.size), head, length & 0xFFFF_FFFF)
        self.next_used = (self.next_used + 1) & 0xFFFF
        # x86 keeps stores in order: the element is visible before the index.
        _U16.pack_into(used, 2, self.next_used)

    # -- notification suppression ------------------------------------------------
    def enable_notification(self) -> bool:
        """Ask the driver to kick for new buffers; True if some arrived meanwhile."""
        if not self.ready:
            return False
        if self.event_idx:
            _U16.pack_into(self._used_view, 4 + 8 * self.size, self.next_avail)
        _fence()
        return self.avail_idx() != self.next_avail

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added so far."""
        if not self.ready:
            return False
        if not self.event_idx:
            return not _U16.unpack_from(self._avail_view, 0)[0] & VRING_AVAIL_F_NO_INTERRUPT
        _fence()
        used_event = _U16.unpack_from(self._avail_view, 4 + 2 * self.size)[0]
        new, old = self.next_used, self.signalled_used
        self.signalled_used = new
        if old is None:
            return True
        # vring_need_event(): did next_used step past used_event since the last check?
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    # -- persist ----------------------------------------------------------------------
    def save(self) -> QueueState:
        return QueueState(max_size=self.max_size, size=self.size, ready=self.ready,
                          desc_table=self.desc_table, avail_ring=self.avail_ring,
                          used_ring=self.used_ring, next_avail=self.next_avail,
                          next_used=self.next_used, event_idx=self.event_idx,
                          indirect=self.indirect)

    def restore(self, state: QueueState) -> None:
        """Strict: a state the running guest could not have produced is refused."""
        if state.max_size != self.max_size:
            raise SnapshotError(f"virtqueue max size {state.max_size} in the snapshot, "
                                f"this device has {self.max_size}")
        for name in ("next_avail", "next_used"):
            v = getattr(state, name)
            if not isinstance(v, int) or not 0 <= v <= 0xFFFF:
                raise SnapshotError(f"virtqueue {name} {v!r} is out of range")
        for name in ("desc_table", "avail_ring", "used_ring"):
            v = getattr(state, name)
            if not isinstance(v, int) or not 0 <= v < 1 << 64:
                raise SnapshotError(f"virtqueue {name} {v!r} is out of range")
        self.reset()
        self.size = state.size
        self.desc_table = state.desc_table
        self.avail_ring = state.avail_ring
        self.used_ring = state.used_ring
        self.next_avail = state.next_avail
        self.next_used = state.next_used
        self.event_idx = bool(state.event_idx)
        self.indirect = bool(state.indirect)
        if state.ready:
            try:
                self.validate()
            except QueueError as e:
                self.reset()
                raise SnapshotError(f"virtqueue in the snapshot is invalid: {e}") from None
            self.ready = True
        elif not (1 <= state.size <= self.max_size and state.size & (state.size - 1) == 0):
            self.reset()
            raise SnapshotError(f"virtqueue size {state.size} in the snapshot is invalid")
