"""virtio-blk through the mmio transport: I/O, GET_ID, flush, discard/write-zeroes, RO,
bad requests, locking, O_DIRECT, throttling, drain and state."""

import os
import struct
import subprocess
import tempfile
import time

import pytest

from stratovirt_py.devices.iothread import IoThread
from stratovirt_py.devices.virtio import blk as B
from stratovirt_py.devices.virtio import mmio as M
from stratovirt_py.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from stratovirt_py.errors import DeviceError, SnapshotError
from stratovirt_py.memory import GuestMemory

from virtio_driver import MmioDriver, roundtrip

SECTORS = 64
PATTERN = bytes(range(256)) * (SECTORS * 512 // 256)


def _supports_direct(d):
    try:
        fd, p = tempfile.mkstemp(dir=d)
        os.close(fd)
        try:
            os.close(os.open(p, os.O_RDWR | os.O_DIRECT))
            return True
        finally:
            os.unlink(p)
    except OSError:
        return False


@pytest.fixture
def direct_dir(tmp_path):
    """A directory on a file system that supports O_DIRECT (tmpfs does not)."""
    for d in (str(tmp_path), "/var/tmp", os.path.join(os.getcwd(), ".pytest_cache")):
        os.makedirs(d, exist_ok=True)
        if _supports_direct(d):
            sub = tempfile.mkdtemp(dir=d, prefix="blk-")
            yield sub
            subprocess.run(["rm", "-rf", sub])
            return
    pytest.skip("no file system with O_DIRECT here")


@pytest.fixture
def image(direct_dir):
    path = os.path.join(direct_dir, "disk.img")
    with open(path, "wb") as f:
        f.write(PATTERN)
    return path


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(8 << 20)
    yield m
    m.close()


class Disk:
    def __init__(self, mem, path, iothread=None, features=None, **kw):
        self.dev = B.Blk(path, **kw)
        self.irq = M.CountingIrq()
        self.t = M.MmioTransport(self.dev, mem, self.irq, iothread=iothread)
        self.d = MmioDriver(self.t, mem)
        self.d.init(features)
        self.q = self.d.queues[0]
        self.mem = mem

    def request(self, rtype, sector=0, out=b"", in_len=0, kick=True, align=None):
        bufs = [(struct.pack("<IIQ", rtype, 0, sector), False)]
        if out:
            bufs.append((out, False))
        if in_len:
            bufs.append((in_len, True))
        bufs.append((1, True))
        head, addrs = self.q.add_chain(bufs, align=align)
        if kick:
            self.d.kick(0)
        return head, addrs

    def run(self, rtype, sector=0, out=b"", in_len=0, align=None):
        head, addrs = self.request(rtype, sector, out, in_len, align=align)
        used = self.q.get_used()
        assert [u[0] for u in used] == [head]
        status = self.mem.read_u8(addrs[-1])
        data = self.mem.read(addrs[-2], in_len) if in_len else b""
        return status, data, used[0][1]

    def close(self):
        self.t.close()


def test_read_write(mem, image):
    disk = Disk(mem, image)
    try:
        st, data, used = disk.run(B.VIRTIO_BLK_T_IN, 2, in_len=1024, align=512)
        assert st == B.VIRTIO_BLK_S_OK and used == 1025
        assert data == PATTERN[1024:2048]
        st, _, used = disk.run(B.VIRTIO_BLK_T_OUT, 4, out=b"\xAB" * 1024, align=512)
        assert st == B.VIRTIO_BLK_S_OK and used == 1
        st, _, _ = disk.run(B.VIRTIO_BLK_T_FLUSH)
        assert st == B.VIRTIO_BLK_S_OK
    finally:
        disk.close()
    with open(image, "rb") as f:
        content = f.read()
    assert content[2048:3072] == b"\xAB" * 1024
    assert content[:2048] == PATTERN[:2048] and content[3072:] == PATTERN[3072:]


def test_unaligned_guest_buffers_use_bounce(mem, image):
    disk = Disk(mem, image)          # direct=True by default
    try:
        # data buffers at odd addresses, split over several descriptors
        hdr = struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 1)
        head, addrs = disk.q.add_chain([(hdr, False), (b"\x11" * 100, False),
                                        (b"\x22" * 412, False), (1, True)], align=2)
        disk.d.kick(0)
        assert disk.q.get_used() == [(head, 1)]
        assert mem.read_u8(addrs[-1]) == 0
        st, data, _ = disk.run(B.VIRTIO_BLK_T_IN, 1, in_len=512, align=8)
        assert st == 0 and data == b"\x11" * 100 + b"\x22" * 412
    finally:
        disk.close()


def test_buffered_mode(mem, tmp_path):
    path = tmp_path / "b.img"
    path.write_bytes(PATTERN)
    disk = Disk(mem, str(path), direct=False)
    try:
        st, data, _ = disk.run(B.VIRTIO_BLK_T_IN, 0, in_len=512, align=2)
        assert st == 0 and data == PATTERN[:512]
    finally:
        disk.close()


def test_get_id(mem, image):
    disk = Disk(mem, image, serial="serial-0123456789abcdefXYZ")
    try:
        st, data, used = disk.run(B.VIRTIO_BLK_T_GET_ID, in_len=20)
        assert st == 0 and data == b"serial-0123456789abc" and used == 21
    finally:
        disk.close()
    disk = Disk(mem, image, serial="abc")
    try:
        st, data, _ = disk.run(B.VIRTIO_BLK_T_GET_ID, in_len=20)
        assert data == b"abc" + bytes(17)
    finally:
        disk.close()


def test_unknown_type_and_out_of_range(mem, image):
    disk = Disk(mem, image)
    try:
        assert disk.run(99, in_len=512)[0] == B.VIRTIO_BLK_S_UNSUPP
        assert disk.run(B.VIRTIO_BLK_T_IN, SECTORS - 1, in_len=1024, align=512)[0] == B.VIRTIO_BLK_S_IOERR
        assert disk.run(B.VIRTIO_BLK_T_OUT, SECTORS, out=bytes(512), align=512)[0] == B.VIRTIO_BLK_S_IOERR
        assert disk.run(B.VIRTIO_BLK_T_IN, 1 << 60, in_len=512, align=512)[0] == B.VIRTIO_BLK_S_IOERR
        assert disk.run(B.VIRTIO_BLK_T_IN, 0, in_len=100)[0] == B.VIRTIO_BLK_S_IOERR  # not sectors
        assert disk.run(B.VIRTIO_BLK_T_IN, SECTORS - 1, in_len=512, align=512)[0] == 0
        assert not disk.d.status & STATUS_DEVICE_NEEDS_RESET
    finally:
        disk.close()
    with open(image, "rb") as f:
        assert f.read() == PATTERN


def test_short_header_needs_reset(mem, image):
    disk = Disk(mem, image)
    try:
        disk.q.add_chain([(b"\0" * 8, False), (1, True)])
        disk.d.kick(0)
        assert disk.d.status & STATUS_DEVICE_NEEDS_RESET
        assert disk.irq.count == 1 and disk.d.rd(M.REG_INTERRUPT_STATUS) == 2
    finally:
        disk.close()


def test_no_status_byte_needs_reset(mem, image):
    disk = Disk(mem, image)
    try:
        disk.q.add_chain([(struct.pack("<IIQ", 0, 0, 0), False)])
        disk.d.kick(0)
        assert disk.d.status & STATUS_DEVICE_NEEDS_RESET
    finally:
        disk.close()


def test_readonly_refuses_writes(mem, image):
    disk = Disk(mem, image, readonly=True)
    try:
        assert disk.d.device_features() & (1 << B.VIRTIO_BLK_F_RO)
        assert disk.run(B.VIRTIO_BLK_T_OUT, 0, out=b"\xFF" * 512, align=512)[0] == B.VIRTIO_BLK_S_IOERR
        st, data, _ = disk.run(B.VIRTIO_BLK_T_IN, 0, in_len=512, align=512)
        assert st == 0 and data == PATTERN[:512]
        assert disk.run(B.VIRTIO_BLK_T_FLUSH)[0] == 0
    finally:
        disk.close()
    with open(image, "rb") as f:
        assert f.read() == PATTERN


def test_config_space(mem, image):
    disk = Disk(mem, image, readonly=True)
    try:
        cap = struct.unpack("<Q", disk.t.read(0x100, 8))[0]
        assert cap == SECTORS
        lo = struct.unpack("<I", disk.t.read(0x100, 4))[0]
        assert lo == SECTORS
        assert struct.unpack("<I", disk.t.read(0x100 + 12, 4))[0] == B.SEG_MAX
        assert struct.unpack("<I", disk.t.read(0x100 + 20, 4))[0] in (512, 4096)
    finally:
        disk.close()


def test_discard_and_write_zeroes(mem, image):
    disk = Disk(mem, image)
    try:
        seg = struct.pack("<QII", 8, 8, 0)
        if disk.dev.can_punch:
            assert disk.run(B.VIRTIO_BLK_T_DISCARD, out=seg)[0] == 0
        seg = struct.pack("<QII", 16, 4, 0)
        assert disk.run(B.VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == 0
        seg = struct.pack("<QII", 24, 4, B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        assert disk.run(B.VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == 0
        seg = struct.pack("<QII", SECTORS - 1, 4, 0)
        assert disk.run(B.VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == B.VIRTIO_BLK_S_IOERR
        seg = struct.pack("<QII", 0, 1, 0x80)
        assert disk.run(B.VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == B.VIRTIO_BLK_S_UNSUPP
    finally:
        disk.close()
    with open(image, "rb") as f:
        content = f.read()
    assert len(content) == len(PATTERN)
    if disk.dev.can_punch:
        assert content[8 * 512:16 * 512] == bytes(4096)
    assert content[16 * 512:20 * 512] == bytes(2048)
    assert content[24 * 512:28 * 512] == bytes(2048)
    assert content[20 * 512:24 * 512] == PATTERN[20 * 512:24 * 512]


def test_discard_not_negotiated_is_unsupported(mem, image):
    disk = Disk(mem, image, features=1 << 32)
    try:
        seg = struct.pack("<QII", 0, 8, 0)
        assert disk.run(B.VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == B.VIRTIO_BLK_S_UNSUPP
    finally:
        disk.close()


def test_lock_conflicts(image):
    a = B.Blk(image)
    try:
        with pytest.raises(DeviceError, match="locked by another process"):
            B.Blk(image)
        with pytest.raises(DeviceError, match="locked"):
            B.Blk(image, readonly=True)
    finally:
        a.close()
    r1 = B.Blk(image, readonly=True)
    r2 = B.Blk(image, readonly=True)
    try:
        with pytest.raises(DeviceError, match="in use by another VM"):
            B.Blk(image)
    finally:
        r1.close()
        r2.close()
    B.Blk(image).close()  # released on close


def test_lock_conflict_across_processes(image):
    a = B.Blk(image)
    try:
        code = ("import sys\nfrom stratovirt_py.devices.virtio.blk import Blk\n"
                "from stratovirt_py.errors import DeviceError\n"
                "try:\n    Blk(sys.argv[1])\nexcept DeviceError as e:\n    print(e); sys.exit(3)\n")
        r = subprocess.run(["python3", "-c", code, image], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        assert r.returncode == 3, r.stderr
        assert "locked by another process" in r.stdout
    finally:
        a.close()


def test_open_errors(tmp_path, direct_dir):
    with pytest.raises(DeviceError, match="does not exist"):
        B.Blk(str(tmp_path / "missing.img"))
    with pytest.raises(DeviceError, match="directory"):
        B.Blk(str(tmp_path), direct=False)
    with pytest.raises(DeviceError, match="aio"):
        B.Blk(str(tmp_path / "x"), aio="bogus")
    p = os.path.join(direct_dir, "ro.img")
    with open(p, "wb") as f:
        f.write(bytes(512))
    os.chmod(p, 0o444)
    if os.geteuid() != 0:
        with pytest.raises(DeviceError, match="permission denied"):
            B.Blk(p)
    B.Blk(p, readonly=True).close()


def test_direct_on_tmpfs_is_a_readable_error():
    shm = "/dev/shm"
    if not os.path.isdir(shm) or _supports_direct(shm):
        pytest.skip("no tmpfs without O_DIRECT here")
    fd, p = tempfile.mkstemp(dir=shm)
    os.close(fd)
    try:
        with pytest.raises(DeviceError, match="direct=off"):
            B.Blk(p)
        B.Blk(p, direct=False).close()
    finally:
        os.unlink(p)


def test_direct_refused_by_file_system(tmp_path, monkeypatch):
    p = tmp_path / "d.img"
    p.write_bytes(bytes(4096))
    real_open = os.open

    def fake_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)
    monkeypatch.setattr(B.os, "open", fake_open)
    with pytest.raises(DeviceError, match=f"{p}.*does not support O_DIRECT.*direct=off"):
        B.Blk(str(p))
    B.Blk(str(p), direct=False).close()


def test_throttling(mem, image):
    io = IoThread("blk-io")
    io.start()
    try:
        disk = Disk(mem, image, iothread=io, iops_total=5)
        heads = []
        for i in range(8):
            heads.append(disk.request(B.VIRTIO_BLK_T_IN, i, in_len=512, kick=False, align=512)[0])
        disk.d.kick(0)
        io.sync()
        time.sleep(0.05)
        done = [u[0] for u in disk.q.get_used()]
        assert done == heads[:5]
        deadline = time.monotonic() + 3
        while len(done) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
            done += [u[0] for u in disk.q.get_used()]
        assert done == heads
        disk.close()
    finally:
        io.stop()


def test_iothread_path(mem, image):
    io = IoThread("blk-io")
    io.start()
    try:
        disk = Disk(mem, image, iothread=io)
        head, addrs = disk.request(B.VIRTIO_BLK_T_IN, 3, in_len=512, kick=False, align=512)
        os.eventfd_write(disk.t.ioeventfds()[0][2], 1)
        assert disk.irq.event.wait(3)
        io.sync()
        assert disk.q.get_used() == [(head, 513)]
        assert mem.read(addrs[1], 512) == PATTERN[3 * 512:4 * 512]
        disk.close()
    finally:
        io.stop()


def test_state_round_trip_and_compat(mem, image, direct_dir):
    disk = Disk(mem, image, serial="s1")
    try:
        disk.t.drain()
        tstate, bstate = disk.t.save(), disk.dev.save()
    finally:
        disk.close()
    copy = os.path.join(direct_dir, "copy.img")
    subprocess.run(["cp", image, copy], check=True)
    dev = B.Blk(copy, serial="s1")
    t = M.MmioTransport(dev, mem, M.CountingIrq())
    try:
        t.restore(roundtrip(tstate))
        dev.restore(roundtrip(bstate))
        t.resume_after_restore()
        assert t.save() == tstate
        assert roundtrip(bstate) == bstate
        d = MmioDriver(t, mem)
        assert d.status == 0xF
    finally:
        t.close()
    other = B.Blk(copy, serial="s2")
    try:
        with pytest.raises(SnapshotError, match="serial"):
            other.restore(bstate)
    finally:
        other.close()
    with open(copy, "ab") as f:
        f.write(bytes(512))
    bigger = B.Blk(copy, serial="s1")
    try:
        with pytest.raises(SnapshotError, match="sectors"):
            bigger.restore(bstate)
    finally:
        bigger.close()


def test_throttled_queue_resumes_after_drain(mem, image):
    io = IoThread("blk-io")
    io.start()
    try:
        disk = Disk(mem, image, iothread=io, iops_total=2)
        heads = [disk.request(B.VIRTIO_BLK_T_IN, i, in_len=512, kick=False, align=512)[0]
                 for i in range(4)]
        disk.d.kick(0)
        io.sync()
        disk.t.drain()                       # the retry timer fires while paused: dropped
        time.sleep(0.6)
        io.sync()
        done = [u[0] for u in disk.q.get_used()]
        assert done == heads[:2]
        disk.t.resume()
        deadline = time.monotonic() + 3
        while len(done) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
            done += [u[0] for u in disk.q.get_used()]
        assert done == heads
        disk.close()
    finally:
        io.stop()


def test_large_unaligned_request_in_chunks(direct_dir):
    mem = GuestMemory.anonymous(16 << 20)
    path = os.path.join(direct_dir, "big.img")
    data = os.urandom(3 << 20)
    with open(path, "wb") as f:
        f.write(data)
    disk = Disk(mem, path)
    try:
        # 2.5 MiB spread over 5 odd-sized, oddly aligned buffers: goes through the bounce
        sizes = [1000, (1 << 20) + 24, 700_000, 500_000, 0]
        sizes[-1] = (5 << 19) - sum(sizes[:-1])
        hdr = struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 8)
        payload = os.urandom(5 << 19)
        bufs, pos = [(hdr, False)], 0
        for n in sizes:
            bufs.append((payload[pos:pos + n], False))
            pos += n
        head, addrs = disk.q.add_chain(bufs + [(1, True)], align=2)
        disk.d.kick(0)
        assert disk.q.get_used() == [(head, 1)] and mem.read_u8(addrs[-1]) == 0
        hdr = struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 8)
        head, addrs = disk.q.add_chain([(hdr, False)] + [(n, True) for n in sizes] + [(1, True)],
                                       align=2)
        disk.d.kick(0)
        assert disk.q.get_used() == [(head, (5 << 19) + 1)]
        assert b"".join(mem.read(a, n) for a, n in zip(addrs[1:], sizes)) == payload
        assert len(disk.dev._bounce) <= 2 << 20
    finally:
        disk.close()
        mem.close()
    with open(path, "rb") as f:
        content = f.read()
    assert content[4096:4096 + (5 << 19)] == payload
    assert content[:4096] == data[:4096]
