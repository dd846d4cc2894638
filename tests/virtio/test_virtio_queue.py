"""Split virtqueue parsing and validation, driven by a driver-side mock queue."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratovirt_py.errors import SnapshotError
from stratovirt_py.memory import GuestMemory
from stratovirt_py.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                                VIRTQ_DESC_F_WRITE, VRING_AVAIL_F_NO_INTERRUPT,
                                                Queue, QueueError, QueueState)

from fuzz_harness import fuzz_settings
from virtio_driver import Allocator, MockDriverQueue, roundtrip

MEM_SIZE = 4 << 20


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.anonymous(MEM_SIZE)
    yield m
    m.close()


def make(mem, size=16, max_size=256, indirect=True):
    drv = MockDriverQueue(mem, size, 0x10000, Allocator())
    q = Queue(mem, max_size)
    q.size = size
    q.desc_table, q.avail_ring, q.used_ring = drv.desc, drv.avail, drv.used
    q.indirect = indirect
    q.validate()
    q.ready = True
    return drv, q


def test_pop_and_used(mem):
    drv, q = make(mem)
    head, addrs = drv.add_chain([(b"hello", False), (b" world", False), (8, True)])
    chain = q.pop()
    assert chain.head == head
    assert chain.read() == b"hello world"
    assert chain.read(3, 5) == b"lo wo"
    assert chain.writable_len == 8
    assert chain.write(2, b"abcdefghij") == 6
    assert mem.read(addrs[2], 8) == b"\0\0abcdef"
    assert q.pop() is None
    q.add_used(head, 6)
    assert drv.get_used() == [(head, 6)]
    assert q.next_avail == 1 and q.next_used == 1


def test_validate_rejects_bad_rings(mem):
    q = Queue(mem, 256)
    q.desc_table, q.avail_ring, q.used_ring = 0x1000, 0x2000, 0x3000
    for size in (0, 3, 512):
        q.size = size
        with pytest.raises(QueueError, match="power of two"):
            q.validate()
    q.size = 16
    q.validate()
    q.desc_table = 0x1008
    with pytest.raises(QueueError, match="aligned"):
        q.validate()
    q.desc_table = 0x1000
    q.used_ring = 0x3002
    with pytest.raises(QueueError, match="aligned"):
        q.validate()
    q.used_ring = MEM_SIZE - 8
    with pytest.raises(QueueError, match="not in guest RAM"):
        q.validate()


def test_looping_chain_is_an_error(mem):
    drv, q = make(mem)
    drv.write_desc(0, 0x200000, 16, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, 0x200010, 16, VIRTQ_DESC_F_NEXT, 0)
    drv.publish(0)
    with pytest.raises(QueueError, match="loops"):
        q.pop()


def test_self_loop_is_an_error(mem):
    drv, q = make(mem)
    drv.write_desc(3, 0x200000, 0, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 3)
    drv.publish(3)
    with pytest.raises(QueueError, match="loops"):
        q.pop()


def test_next_out_of_range(mem):
    drv, q = make(mem)
    drv.write_desc(0, 0x200000, 16, VIRTQ_DESC_F_NEXT, 16)
    drv.publish(0)
    with pytest.raises(QueueError, match="out of range"):
        q.pop()


def test_head_out_of_range(mem):
    drv, q = make(mem)
    drv.publish(40)
    with pytest.raises(QueueError, match="head 40"):
        q.pop()


def test_buffer_outside_ram(mem):
    drv, q = make(mem)
    drv.write_desc(0, MEM_SIZE - 8, 16, 0, 0)
    drv.publish(0)
    with pytest.raises(QueueError, match="not in guest RAM"):
        q.pop()
    drv2, q2 = make(mem)
    drv2.write_desc(0, (1 << 64) - 8, 16, 0, 0)
    drv2.publish(0)
    with pytest.raises(QueueError):
        q2.pop()


def test_avail_index_too_far_ahead(mem):
    drv, q = make(mem)
    mem.write_u16(drv.avail + 2, 17)
    with pytest.raises(QueueError, match="ahead"):
        q.pop()


def test_readable_after_writable(mem):
    drv, q = make(mem)
    drv.add_chain([(4, True), (b"abcd", False)])
    with pytest.raises(QueueError, match="after a device-writable"):
        q.pop()


def test_indirect_chain(mem):
    drv, q = make(mem)
    head, addrs = drv.add_indirect([(b"head", False), (b"er", False), (4, True)])
    chain = q.pop()
    assert chain.head == head
    assert chain.read() == b"header"
    assert chain.writable == [(addrs[2], 4)]


def test_indirect_not_negotiated(mem):
    drv, q = make(mem, indirect=False)
    drv.add_indirect([(b"x", False)])
    with pytest.raises(QueueError, match="not negotiated"):
        q.pop()


def test_indirect_bad_tables(mem):
    drv, q = make(mem)
    # nested
    table = drv.alloc.alloc(32, 16)
    drv.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT, 0, table=table)
    drv.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(0)
    with pytest.raises(QueueError, match="nested"):
        q.pop()
    for length, flags, match in ((24, VIRTQ_DESC_F_INDIRECT, "length"),
                                 (0, VIRTQ_DESC_F_INDIRECT, "length"),
                                 (16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, "NEXT")):
        drv, q = make(mem)
        drv.write_desc(0, table, length, flags, 1)
        drv.publish(0)
        with pytest.raises(QueueError, match=match):
            q.pop()
    drv, q = make(mem)
    drv.write_desc(0, MEM_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(0)
    with pytest.raises(QueueError, match="not in guest RAM"):
        q.pop()


def test_indirect_loop(mem):
    drv, q = make(mem)
    table = drv.alloc.alloc(32, 16)
    drv.write_desc(0, 0x200000, 8, VIRTQ_DESC_F_NEXT, 1, table=table)
    drv.write_desc(1, 0x200000, 8, VIRTQ_DESC_F_NEXT, 0, table=table)
    drv.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(0)
    with pytest.raises(QueueError, match="loops"):
        q.pop()


def test_chain_of_4gib_is_refused():
    big = GuestMemory.anonymous(3 << 30)  # MAP_NORESERVE: costs nothing until touched
    try:
        drv = MockDriverQueue(big, 16, 0x10000, Allocator())
        q = Queue(big, 16)
        q.desc_table, q.avail_ring, q.used_ring = drv.desc, drv.avail, drv.used
        q.validate()
        q.ready = True
        drv.write_desc(0, 0x100000, 0xB000_0000, VIRTQ_DESC_F_NEXT, 1)
        drv.write_desc(1, 0x100000, 0x5000_0000, 0, 0)
        drv.publish(0)
        with pytest.raises(QueueError, match="4 GiB"):
            q.pop()
    finally:
        big.close()


def test_notification_without_event_idx(mem):
    drv, q = make(mem)
    assert q.needs_notification()
    mem.write_u16(drv.avail, VRING_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_notification()


def test_event_idx(mem):
    drv, q = make(mem)
    q.event_idx = True
    for _ in range(4):
        drv.add_chain([(4, True)])
    drv.set_used_event(2)   # interrupt me when used idx passes 2
    assert q.needs_notification()            # first check always notifies
    for _ in range(2):
        c = q.pop()
        q.add_used(c.head, 0)
    assert not q.needs_notification()        # next_used == 2: not past used_event yet
    c = q.pop()
    q.add_used(c.head, 0)
    assert q.needs_notification()            # 3 > 2
    c = q.pop()
    q.add_used(c.head, 0)
    assert not q.needs_notification()        # already signalled past 2
    assert not q.enable_notification()
    assert drv.avail_event() == 4
    drv.add_chain([(4, True)])
    assert q.enable_notification()           # arrived after the device looked


def test_undo_pop(mem):
    drv, q = make(mem)
    head, _ = drv.add_chain([(4, True)])
    assert q.pop().head == head
    q.undo_pop()
    assert q.pop().head == head


@fuzz_settings(300)
@given(descs=st.lists(st.tuples(st.sampled_from([0, 0x200000, 0x3FFFF0, MEM_SIZE, 1 << 63,
                                                  0x200008]),
                                st.sampled_from([0, 1, 16, 0x1000, 0x20, 0xFFFF_FFFF, 48]),
                                st.integers(0, 7), st.integers(0, 20)),
                      min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 12), min_size=1, max_size=4),
       avail_idx=st.integers(0, 0xFFFF), indirect=st.booleans())
def test_random_tables_never_escape(mem, descs, heads, avail_idx, indirect):
    drv, q = make(mem, size=8, indirect=indirect)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        drv.write_desc(i, addr, length, flags, nxt)
    # a few descriptors are also an indirect table at 0x200000
    for i, (addr, length, flags, nxt) in enumerate(descs[:4]):
        mem.write(0x200000 + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
    for h in heads:
        drv.publish(h)
    if avail_idx % 3 == 0:
        mem.write_u16(drv.avail + 2, avail_idx)
    for _ in range(len(heads) + 1):
        try:
            chain = q.pop()
        except QueueError:
            break
        if chain is None:
            break
        for addr, n in chain.readable + chain.writable:
            assert mem.check(addr, n)
        assert chain.readable_len + chain.writable_len < 1 << 32


def test_state_round_trip(mem):
    drv, q = make(mem)
    drv.add_chain([(4, True)])
    q.add_used(q.pop().head, 4)
    state = q.save()
    q2 = Queue(mem, 256)
    q2.restore(roundtrip(state))
    assert q2.save() == state
    assert q2.ready and q2.next_avail == 1 and q2.next_used == 1


def test_restore_is_strict(mem):
    drv, q = make(mem)
    good = q.save()
    q2 = Queue(mem, 256)
    bad = [
        QueueState(**{**good.__dict__, "max_size": 128}),
        QueueState(**{**good.__dict__, "size": 24}),
        QueueState(**{**good.__dict__, "desc_table": 0x10008}),
        QueueState(**{**good.__dict__, "used_ring": MEM_SIZE}),
        QueueState(**{**good.__dict__, "next_avail": 1 << 16}),
        QueueState(**{**good.__dict__, "ready": False, "size": 0}),
    ]
    for st_ in bad:
        with pytest.raises(SnapshotError):
            q2.restore(st_)
        assert not q2.ready
