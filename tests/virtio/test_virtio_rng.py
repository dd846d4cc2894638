"""virtio-rng: buffers filled from the host source, optional rate limit."""

import time

import pytest

from stratovirt_py.devices.iothread import IoThread
from stratovirt_py.devices.virtio import mmio as M
from stratovirt_py.devices.virtio.rng import Rng
from stratovirt_py.errors import DeviceError
from stratovirt_py.memory import GuestMemory

from virtio_driver import MmioDriver, roundtrip


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(8 << 20)
    yield m
    m.close()


def test_fills_from_source(mem, tmp_path):
    src = tmp_path / "entropy"
    src.write_bytes(b"0123456789" * 10)
    dev = Rng(str(src))
    t = M.MmioTransport(dev, mem, M.CountingIrq())
    d = MmioDriver(t, mem)
    d.init()
    q = d.queues[0]
    h1, a1 = q.add_chain([(4, True), (4, True)])
    h2, a2 = q.add_chain([(16, True)])
    d.kick(0)
    assert q.get_used() == [(h1, 8), (h2, 16)]
    assert mem.read(a1[0], 4) + mem.read(a1[1], 4) == b"01234567"
    assert mem.read(a2[0], 16) == b"8901234567890123"
    assert roundtrip(dev.save()) == dev.save()
    t.close()


def test_rate_limit(mem):
    io = IoThread("rng-io")
    io.start()
    try:
        dev = Rng("/dev/urandom", max_bytes=64, period_ms=200)
        t = M.MmioTransport(dev, mem, M.CountingIrq(), iothread=io)
        d = MmioDriver(t, mem)
        d.init()
        q = d.queues[0]
        for _ in range(3):
            q.add_chain([(48, True)])
        start = time.monotonic()
        d.kick(0)
        io.sync()
        first = q.get_used()
        assert [n for _, n in first] == [48, 16]
        deadline = time.monotonic() + 3
        rest = []
        while not rest and time.monotonic() < deadline:
            time.sleep(0.01)
            rest = q.get_used()
        assert [n for _, n in rest] == [48]
        assert time.monotonic() - start >= 0.15
        t.close()
    finally:
        io.stop()


def test_missing_source():
    with pytest.raises(DeviceError, match="does not exist"):
        Rng("/nonexistent/random")
