"""The driver side, for tests: split rings laid out in a GuestMemory, and a register-level
virtio-mmio driver that negotiates features, sets up queues and kicks through ``write()``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
from typing import List, Optional, Sequence, Tuple, Union

from stratovirt_py.devices.virtio import mmio as M
from stratovirt_py.devices.virtio.device import (STATUS_ACKNOWLEDGE, STATUS_DRIVER,
                                                 STATUS_DRIVER_OK, STATUS_FEATURES_OK,
                                                 VIRTIO_F_VERSION_1)
from stratovirt_py.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                                VIRTQ_DESC_F_WRITE)
from stratovirt_py.memory import GuestMemory

DATA_BASE = 0x100000


class Allocator:
    """Bump allocator for driver buffers in guest memory."""

    def __init__(self, base: int = DATA_BASE, align: int = 16):
        self.next = base
        self.align = align

    def alloc(self, size: int, align: Optional[int] = None) -> int:
        a = align or self.align
        self.next = -(-self.next // a) * a
        addr = self.next
        self.next += max(size, 1)
        return addr


Buf = Tuple[Union[bytes, int], bool]  # (data to place | length, device-writable?)


class MockDriverQueue:
    """A split virtqueue as the driver lays it out."""

    def __init__(self, mem: GuestMemory, size: int, base: int, alloc: Allocator):
        self.mem = mem
        self.size = size
        self.alloc = alloc
        self.desc = base
        self.avail = base + 16 * size
        self.used = -(-(self.avail + 6 + 2 * size) // 4) * 4
        self.avail_idx = 0
        self.used_seen = 0
        self.free = 0  # next descriptor slot (no reuse tracking: tests are short)
        mem.write(self.desc, bytes(16 * size))
        mem.write(self.avail, bytes(6 + 2 * size))
        mem.write(self.used, bytes(6 + 8 * size))

    def write_desc(self, idx: int, addr: int, length: int, flags: int, nxt: int,
                   table: Optional[int] = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * idx, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def add_chain(self, bufs: Sequence[Buf], align: Optional[int] = None) -> Tuple[int, List[int]]:
        """Place buffers, chain descriptors, publish; returns (head, buffer addresses)."""
        addrs = []
        idxs = []
        for data, writable in bufs:
            length = data if isinstance(data, int) else len(data)
            addr = self.alloc.alloc(length, align)
            if not isinstance(data, int):
                self.mem.write(addr, data)
            addrs.append(addr)
            idxs.append(self.free % self.size)
            self.free += 1
        for k, ((data, writable), addr, idx) in enumerate(zip(bufs, addrs, idxs)):
            length = data if isinstance(data, int) else len(data)
            flags = (VIRTQ_DESC_F_WRITE if writable else 0)
            nxt = 0
            if k + 1 < len(bufs):
                flags |= VIRTQ_DESC_F_NEXT
                nxt = idxs[k + 1]
            self.write_desc(idx, addr, length, flags, nxt)
        self.publish(idxs[0])
        return idxs[0], addrs

    def add_indirect(self, bufs: Sequence[Buf]) -> Tuple[int, List[int]]:
        table = self.alloc.alloc(16 * len(bufs), 16)
        addrs = []
        for k, (data, writable) in enumerate(bufs):
            length = data if isinstance(data, int) else len(data)
            addr = self.alloc.alloc(length)
            if not isinstance(data, int):
                self.mem.write(addr, data)
            addrs.append(addr)
            flags = (VIRTQ_DESC_F_WRITE if writable else 0)
            if k + 1 < len(bufs):
                flags |= VIRTQ_DESC_F_NEXT
            self.write_desc(k, addr, length, flags, k + 1, table=table)
        head = self.free % self.size
        self.free += 1
        self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        self.publish(head)
        return head, addrs

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def get_used(self) -> List[Tuple[int, int]]:
        """New used entries (id, len) since the last call."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    # event-idx fields
    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)


class MmioDriver:
    """Talks to an MmioTransport through its registers only."""

    def __init__(self, transport: M.MmioTransport, mem: GuestMemory,
                 alloc: Optional[Allocator] = None, queue_base: int = 0x10000):
        self.t = transport
        self.mem = mem
        self.alloc = alloc or Allocator()
        self.queue_base = queue_base
        self.queues: List[MockDriverQueue] = []

    def rd(self, off: int) -> int:
        return struct.unpack("<I", self.t.read(off, 4))[0]

    def wr(self, off: int, value: int) -> None:
        self.t.write(off, struct.pack("<I", value & 0xFFFF_FFFF))

    def device_features(self) -> int:
        self.wr(M.REG_DEVICE_FEATURES_SEL, 0)
        lo = self.rd(M.REG_DEVICE_FEATURES)
        self.wr(M.REG_DEVICE_FEATURES_SEL, 1)
        return lo | self.rd(M.REG_DEVICE_FEATURES) << 32

    def negotiate(self, features: Optional[int] = None) -> bool:
        self.wr(M.REG_STATUS, 0)
        self.wr(M.REG_STATUS, STATUS_ACKNOWLEDGE)
        self.wr(M.REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        if features is None:
            features = self.device_features()
        for sel in (0, 1):
            self.wr(M.REG_DRIVER_FEATURES_SEL, sel)
            self.wr(M.REG_DRIVER_FEATURES, features >> (32 * sel))
        self.wr(M.REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return bool(self.rd(M.REG_STATUS) & STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: Optional[int] = None) -> MockDriverQueue:
        self.wr(M.REG_QUEUE_SEL, index)
        size = size or self.rd(M.REG_QUEUE_NUM_MAX)
        q = MockDriverQueue(self.mem, size, self.queue_base + 0x10000 * index, self.alloc)
        self.wr(M.REG_QUEUE_NUM, size)
        for lo, value in ((M.REG_QUEUE_DESC_LOW, q.desc), (M.REG_QUEUE_DRIVER_LOW, q.avail),
                          (M.REG_QUEUE_DEVICE_LOW, q.used)):
            self.wr(lo, value)
            self.wr(lo + 4, value >> 32)
        self.wr(M.REG_QUEUE_READY, 1)
        while len(self.queues) <= index:
            self.queues.append(None)
        self.queues[index] = q
        return q

    def init(self, features: Optional[int] = None, nqueues: Optional[int] = None) -> None:
        assert self.negotiate(features), "FEATURES_OK refused"
        n = nqueues if nqueues is not None else len(self.t.queues)
        for i in range(n):
            self.setup_queue(i)
        self.wr(M.REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    def kick(self, index: int) -> None:
        self.wr(M.REG_QUEUE_NOTIFY, index)

    @property
    def status(self) -> int:
        return self.rd(M.REG_STATUS)


def version1_only(driver: MmioDriver) -> int:
    return 1 << VIRTIO_F_VERSION_1


# -- state encoding round trip (what the snapshot format does: asdict -> text -> back) --
def _enc(o):
    if isinstance(o, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(o)).decode()}
    if isinstance(o, dict):
        return {k: _enc(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_enc(v) for v in o]
    return o


def _dec(o):
    if isinstance(o, dict):
        if set(o) == {"__bytes__"}:
            return base64.b64decode(o["__bytes__"])
        return {k: _dec(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_dec(v) for v in o]
    return o


def roundtrip(state):
    """save -> encode -> decode -> dataclass, with the snapshot codec when it is there."""
    try:
        from stratovirt_py.migration.codec import decode, encode
        d = decode(encode(state))
    except ImportError:
        d = _dec(json.loads(json.dumps(_enc(dataclasses.asdict(state)))))
    cls = type(state)
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    return cls(**d)
