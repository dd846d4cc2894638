"""virtio-mmio transport: registers, feature negotiation, status machine, NEEDS_RESET
containment, interrupts, the I/O thread path and state round trips."""

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratovirt_py.devices.iothread import IoThread
from stratovirt_py.devices.virtio import mmio as M
from stratovirt_py.devices.virtio.device import (STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET,
                                                 STATUS_DRIVER, STATUS_DRIVER_OK,
                                                 STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
                                                 VIRTIO_RING_F_EVENT_IDX)
from stratovirt_py.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from stratovirt_py.devices.virtio.rng import Rng
from stratovirt_py.errors import SnapshotError
from stratovirt_py.memory import GuestMemory

from virtio_driver import Allocator, MmioDriver, roundtrip


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(8 << 20)
    yield m
    m.close()


def make(mem, iothread=None, alloc=None, queue_base=0x10000):
    irq = M.CountingIrq()
    t = M.MmioTransport(Rng("/dev/urandom"), mem, irq, iothread=iothread)
    return t, irq, MmioDriver(t, mem, alloc, queue_base)


def wait_for(pred, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.002)
    return pred()


def test_identity_registers(mem):
    t, _, d = make(mem)
    assert d.rd(M.REG_MAGIC) == 0x74726976
    assert t.read(0, 4) == b"virt"
    assert d.rd(M.REG_VERSION) == 2
    assert d.rd(M.REG_DEVICE_ID) == 4
    assert d.rd(M.REG_VENDOR_ID) == M.VENDOR_ID
    assert d.device_features() & (1 << VIRTIO_F_VERSION_1)
    d.wr(M.REG_QUEUE_SEL, 0)
    assert d.rd(M.REG_QUEUE_NUM_MAX) == 256
    d.wr(M.REG_QUEUE_SEL, 5)
    assert d.rd(M.REG_QUEUE_NUM_MAX) == 0
    # bad accesses are ignored, never raise
    assert t.read(0x2, 4) == bytes(4)
    assert t.read(0x0, 2) == bytes(2)
    t.write(0x70, b"\x01")
    t.write(0x1F0, b"\x01\x02\x03")
    assert d.status == 0


def test_ioeventfds(mem):
    t, _, _ = make(mem)
    fds = t.ioeventfds()
    assert [(o, m) for o, m, _ in fds] == [(0x50, 0)]
    os.fstat(fds[0][2])
    t.close()


def test_features_ok_requires_version_1(mem):
    t, _, d = make(mem)
    assert not d.negotiate(0)
    assert not d.rd(M.REG_STATUS) & STATUS_FEATURES_OK
    assert not d.negotiate(d.device_features() | (1 << 40))   # not offered
    assert d.negotiate(1 << VIRTIO_F_VERSION_1)
    assert t.acked_features == 1 << VIRTIO_F_VERSION_1


def test_status_machine(mem):
    t, _, d = make(mem)
    d.wr(M.REG_STATUS, STATUS_DRIVER)          # DRIVER before ACKNOWLEDGE
    assert d.status == 0
    d.wr(M.REG_STATUS, STATUS_ACKNOWLEDGE)
    d.wr(M.REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)  # no FEATURES_OK
    assert d.status == STATUS_ACKNOWLEDGE
    d.init()
    assert d.status == 0xF
    assert t.active
    d.wr(M.REG_STATUS, 0)                      # reset
    assert d.status == 0 and t.acked_features == 0 and not t.queues[0].ready


def test_queue_ready_validates(mem):
    t, irq, d = make(mem)
    d.negotiate()
    d.wr(M.REG_QUEUE_SEL, 0)
    d.wr(M.REG_QUEUE_NUM, 100)                 # not a power of two
    d.wr(M.REG_QUEUE_READY, 1)
    assert d.rd(M.REG_QUEUE_READY) == 0
    assert d.status & STATUS_DEVICE_NEEDS_RESET


def test_queue_registers_frozen_while_ready(mem):
    t, _, d = make(mem)
    d.init()
    desc = t.queues[0].desc_table
    d.wr(M.REG_QUEUE_DESC_LOW, 0x8000)
    assert t.queues[0].desc_table == desc
    assert d.rd(M.REG_QUEUE_DESC_LOW) == desc


def test_rng_request_inline_and_interrupt(mem):
    t, irq, d = make(mem)
    d.init()
    q = d.queues[0]
    head, addrs = q.add_chain([(64, True)])
    d.kick(0)
    assert q.get_used() == [(head, 64)]
    assert mem.read(addrs[0], 64) != bytes(64)
    assert irq.count == 1
    assert d.rd(M.REG_INTERRUPT_STATUS) == 1
    d.wr(M.REG_INTERRUPT_ACK, 1)
    assert d.rd(M.REG_INTERRUPT_STATUS) == 0


def test_looping_chain_needs_reset_and_other_device_keeps_working(mem):
    io = IoThread("test-io")
    io.start()
    try:
        alloc = Allocator()
        t1, irq1, d1 = make(mem, io, alloc, 0x10000)
        t2, irq2, d2 = make(mem, io, alloc, 0x40000)
        d1.init()
        d2.init()
        q1 = d1.queues[0]
        q1.write_desc(0, 0x300000, 16, VIRTQ_DESC_F_NEXT | 2, 1)
        q1.write_desc(1, 0x300010, 16, VIRTQ_DESC_F_NEXT | 2, 0)
        q1.publish(0)
        os.eventfd_write(t1.ioeventfds()[0][2], 1)    # what KVM does on a guest kick
        assert wait_for(lambda: d1.status & STATUS_DEVICE_NEEDS_RESET)
        assert wait_for(lambda: d1.rd(M.REG_INTERRUPT_STATUS) & 2)
        assert irq1.count >= 1
        # the other device still works
        head, _ = d2.queues[0].add_chain([(32, True)])
        d2.kick(0)
        assert wait_for(lambda: d2.queues[0].get_used() == [(head, 32)])
        # the broken device ignores kicks until reset, then works again
        d1.kick(0)
        io.sync()
        assert q1.get_used() == []
        d1.init()
        assert d1.status == 0xF
        head, _ = d1.queues[0].add_chain([(8, True)])
        d1.kick(0)
        assert wait_for(lambda: d1.queues[0].get_used() == [(head, 8)])
    finally:
        io.stop()


def test_event_idx_suppresses_interrupts(mem):
    t, irq, d = make(mem)
    d.init(d.device_features())
    assert t.has_feature(VIRTIO_RING_F_EVENT_IDX)
    q = d.queues[0]
    q.add_chain([(8, True)])
    d.kick(0)
    assert irq.count == 1
    assert q.avail_event() == 1
    q.set_used_event(5)                  # do not interrupt before used idx passes 5
    q.add_chain([(8, True)])
    d.kick(0)
    assert irq.count == 1
    assert len(q.get_used()) == 2


def test_buffers_before_driver_ok_are_processed(mem):
    t, irq, d = make(mem)
    assert d.negotiate()
    q = d.setup_queue(0)
    head, _ = q.add_chain([(8, True)])
    d.kick(0)                            # too early: ignored
    assert q.get_used() == []
    d.wr(M.REG_STATUS, 0xF)
    assert q.get_used() == [(head, 8)]


def test_drain_and_resume(mem):
    t, irq, d = make(mem)
    d.init()
    t.drain()
    q = d.queues[0]
    head, _ = q.add_chain([(8, True)])
    d.kick(0)
    assert q.get_used() == []
    t.resume()
    assert q.get_used() == [(head, 8)]


def test_transport_state_round_trip(mem):
    t, irq, d = make(mem)
    d.init()
    q = d.queues[0]
    q.add_chain([(8, True)])
    d.kick(0)
    t.config_changed()
    state = t.save()
    assert state.config_generation == 1
    t2, irq2, d2 = make(mem)
    t2.restore(roundtrip(state))
    assert t2.save() == state
    assert not irq2.count
    # resumes without a kick: work queued while "paused" gets done
    head, _ = q.add_chain([(8, True)])
    t2.resume_after_restore()
    assert irq2.count >= 1
    assert q.get_used()[-1] == (head, 8)


def test_transport_restore_is_strict(mem):
    t, _, d = make(mem)
    d.init()
    state = t.save()
    t2, _, _ = make(mem)
    for bad in (dict(device_id=2), dict(acked_features=1 << 50), dict(queues=[]),
                dict(status=0x1FF)):
        with pytest.raises(SnapshotError):
            t2.restore(M.MmioTransportState(**{**state.__dict__, **bad}))


_REGS = [0x0, 0x4, 0x8, 0xC, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60,
         0x64, 0x70, 0x80, 0x84, 0x90, 0x94, 0xA0, 0xA4, 0xAC, 0xFC, 0x100, 0x104, 0x1FC, 0x3]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from(_REGS), st.sampled_from([1, 2, 4, 8]),
                              st.sampled_from([0, 1, 2, 3, 4, 7, 8, 0xB, 0xF, 0x40, 0x80, 16, 256,
                                               0x10000, 0x10100, 0x7FFFFFF0, 0xFFFFFFFF])),
                    max_size=60))
def test_random_register_traffic_never_raises(mem, caplog, ops):
    t, irq, d = make(mem)
    for is_write, off, size, value in ops:
        if is_write:
            t.write(off, value.to_bytes(8, "little")[:size])
        else:
            assert len(t.read(off, size)) == size
    assert "Traceback" not in caplog.text and "failed" not in caplog.text
    t.close()
