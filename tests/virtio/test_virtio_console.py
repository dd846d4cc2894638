"""virtio-console (virtio-serial, one port) and the chardev backends."""

import os
import socket
import struct
import time

import pytest

from stratovirt_py.devices import chardev as C
from stratovirt_py.devices.iothread import IoThread
from stratovirt_py.devices.virtio import mmio as M
from stratovirt_py.devices.virtio.console import (MAX_PENDING_INPUT, RX_QUEUE, TX_QUEUE,
                                                  Console, ConsoleState)
from stratovirt_py.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from stratovirt_py.errors import DeviceError, SnapshotError
from stratovirt_py.memory import GuestMemory

from virtio_driver import MmioDriver, roundtrip


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(8 << 20)
    yield m
    m.close()


@pytest.fixture
def io():
    t = IoThread("console-io")
    t.start()
    yield t
    t.stop()


class Recorder(C.CharBackend):
    def __init__(self):
        super().__init__("rec")
        self.out = bytearray()

    def write(self, data):
        self.out += data


def wait_for(pred, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def make(mem, backend, io=None):
    dev = Console(backend)
    irq = M.CountingIrq()
    t = M.MmioTransport(dev, mem, irq, iothread=io)
    return dev, t, irq, MmioDriver(t, mem)


def test_output_goes_to_backend(mem):
    rec = Recorder()
    dev, t, irq, d = make(mem, rec)
    assert d.rd(M.REG_DEVICE_ID) == 3
    d.init()
    tx = d.queues[TX_QUEUE]
    h1, _ = tx.add_chain([(b"hello ", False)])
    h2, _ = tx.add_chain([(b"wor", False), (b"ld\n", False)])
    d.kick(TX_QUEUE)
    assert bytes(rec.out) == b"hello world\n"
    assert tx.get_used() == [(h1, 0), (h2, 0)]
    assert irq.count == 1


def test_input_waits_for_buffers(mem):
    rec = Recorder()
    dev, t, irq, d = make(mem, rec)
    rec._deliver(b"early input")           # before the driver is up: kept
    d.init()
    rx = d.queues[RX_QUEUE]
    head, addrs = rx.add_chain([(4, True)])
    d.kick(RX_QUEUE)
    assert rx.get_used() == [(head, 4)]
    assert mem.read(addrs[0], 4) == b"earl"
    assert dev.pending_input == b"y input"
    head, addrs = rx.add_chain([(64, True)])
    d.kick(RX_QUEUE)
    assert rx.get_used() == [(head, 7)]
    assert mem.read(addrs[0], 7) == b"y input"
    rec._deliver(b"more")                  # no buffer now: pending until the driver adds one
    assert dev.pending_input == b"more"
    head, addrs = rx.add_chain([(64, True)])
    d.kick(RX_QUEUE)
    assert mem.read(addrs[0], 4) == b"more"


def test_input_is_bounded(mem):
    rec = Recorder()
    dev, t, irq, d = make(mem, rec)
    rec._deliver(b"x" * (MAX_PENDING_INPUT + 10))
    assert len(dev.pending_input) == MAX_PENDING_INPUT


def test_emergency_write(mem):
    rec = Recorder()
    dev, t, irq, d = make(mem, rec)
    d.init()
    t.write(0x108, struct.pack("<I", ord("!")))
    assert bytes(rec.out) == b"!"
    assert struct.unpack("<I", t.read(0x104, 4))[0] == 1   # max_nr_ports


def test_bad_tx_chain_needs_reset(mem):
    rec = Recorder()
    dev, t, irq, d = make(mem, rec)
    d.init()
    tx = d.queues[TX_QUEUE]
    tx.write_desc(0, 0x7FFFF00, 0x1000, 0, 0)   # outside 8 MiB of RAM
    tx.publish(0)
    d.kick(TX_QUEUE)
    assert d.status & STATUS_DEVICE_NEEDS_RESET
    assert rec.out == b""


def test_state_round_trip(mem):
    rec = Recorder()
    dev, t, irq, d = make(mem, rec)
    d.init()
    rec._deliver(b"typed before the snapshot")
    t.drain()
    tstate, cstate = t.save(), dev.save()
    assert roundtrip(cstate) == cstate
    rec2 = Recorder()
    dev2, t2, irq2, d2 = make(mem, rec2)
    t2.restore(roundtrip(tstate))
    dev2.restore(roundtrip(cstate))
    rx = d.queues[RX_QUEUE]
    head, addrs = rx.add_chain([(64, True)])
    t2.resume_after_restore()                  # no kick needed
    assert rx.get_used() == [(head, 25)]
    assert mem.read(addrs[0], 25) == b"typed before the snapshot"
    with pytest.raises(SnapshotError):
        dev2.restore(ConsoleState(pending_input=b"x" * (MAX_PENDING_INPUT + 1)))


def test_socket_backend_round_trip(mem, io, tmp_path):
    path = str(tmp_path / "console.sock")
    backend = C.create_chardev("socket", "charconsole0", path=path, server=True, nowait=True)
    dev, t, irq, d = make(mem, backend, io)
    try:
        d.init()
        rx, tx = d.queues[RX_QUEUE], d.queues[TX_QUEUE]
        head, addrs = rx.add_chain([(64, True)])
        d.kick(RX_QUEUE)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        assert wait_for(lambda: backend.client is not None)
        client.sendall(b"ls\r")
        assert wait_for(lambda: rx.used_idx() == 1)
        assert rx.get_used() == [(head, 3)]
        assert mem.read(addrs[0], 3) == b"ls\r"
        tx.add_chain([(b"bin etc\r\n", False)])
        d.kick(TX_QUEUE)
        client.settimeout(3)
        assert client.recv(100) == b"bin etc\r\n"
        # a second client is turned away, the first one keeps working
        c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c2.connect(path)
        c2.settimeout(3)
        assert c2.recv(10) == b""
        client.close()
        assert wait_for(lambda: backend.client is None)
        tx.add_chain([(b"nobody listens", False)])   # dropped, not blocking
        d.kick(TX_QUEUE)
        # The kick reaches the I/O thread through an eventfd, not its call queue: wait
        # for the effect rather than io.sync(), which may run first.
        assert wait_for(lambda: backend.dropped >= 14)
    finally:
        t.close()
    assert not os.path.exists(path)


def test_file_backend(mem, tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"old\n")
    backend = C.create_chardev("file", "c0", path=str(path))
    dev, t, irq, d = make(mem, backend)
    d.init()
    d.queues[TX_QUEUE].add_chain([(b"new\n", False)])
    d.kick(TX_QUEUE)
    t.close()
    assert path.read_bytes() == b"old\nnew\n"


def test_pty_backend(mem, io, capfd):
    backend = C.create_chardev("pty", "c1")
    assert "char device redirected to /dev/pts/" in capfd.readouterr().err
    dev, t, irq, d = make(mem, backend, io)
    try:
        d.init()
        rx, tx = d.queues[RX_QUEUE], d.queues[TX_QUEUE]
        fd = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
        try:
            head, addrs = rx.add_chain([(16, True)])
            d.kick(RX_QUEUE)
            os.write(fd, b"hi")
            assert wait_for(lambda: rx.used_idx() == 1)
            assert mem.read(addrs[0], 2) == b"hi"
            tx.add_chain([(b"out", False)])
            d.kick(TX_QUEUE)
            io.sync()
            assert os.read(fd, 10) == b"out"
        finally:
            os.close(fd)
    finally:
        t.close()


def test_chardev_errors(tmp_path):
    with pytest.raises(DeviceError, match="unsupported"):
        C.create_chardev("tcp", "x")
    with pytest.raises(DeviceError, match="path"):
        C.create_chardev("file", "x")
    with pytest.raises(DeviceError, match="cannot connect"):
        C.create_chardev("socket", "x", path=str(tmp_path / "none.sock"), server=False)
