"""virtio-net through the mmio transport, with a fake tap (a SOCK_SEQPACKET pair keeps
frame boundaries like a tap fd), plus the tap backend's checks and errors on real
/dev/net/tun fds (the ones that create interfaces run inside a throw-away netns)."""

import os
import socket
import struct
import subprocess
import time
import uuid

import pytest
from nettools import in_netns

from stratovirt_py.config import DeviceConfig, NetdevConfig, VmConfig
from stratovirt_py.devices import tap as T
from stratovirt_py.devices.iothread import IoThread
from stratovirt_py.devices.virtio import mmio as M
from stratovirt_py.devices.virtio import net as N
from stratovirt_py.devices.virtio.device import (STATUS_DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1,
                                                 VIRTIO_RING_F_EVENT_IDX, bit)
from stratovirt_py.errors import ConfigError, DeviceError, SnapshotError
from stratovirt_py.memory import GuestMemory

from virtio_driver import MmioDriver, roundtrip

MAC = bytes.fromhex("525400abcdef")
HDR = N.HDR_LEN


class FakeTap:
    """Duck-typed ``Tap`` over one end of a SOCK_SEQPACKET pair; ``peer`` is the host side."""

    def __init__(self, vnet_hdr=True, offloads_supported=True, name="faketap"):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        self._sock = a
        self.peer = b
        self.peer.settimeout(5)
        self.fd = a.fileno()
        self.ifname = name
        self.netdev_id = "n-" + name
        self.vnet_hdr = vnet_hdr
        self.offloads_supported = offloads_supported
        self.offloads = 0
        self.offload_calls = []

    def set_offload(self, flags):
        self.offload_calls.append(flags)
        self.offloads = flags

    def readv(self, buffers):
        try:
            return os.readv(self.fd, buffers)
        except BlockingIOError:
            return None

    def writev(self, buffers):
        try:
            return os.writev(self.fd, buffers)
        except BlockingIOError:
            return None

    def queued(self):
        """Whether a frame waits on the device side (without taking it)."""
        try:
            self._sock.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False

    def close(self):
        if self.fd >= 0:
            self._sock.close()
            self.fd = -1

    def close_peer(self):
        self.peer.close()


def frame(payload=b"hello", src=MAC, dst=b"\xff" * 6, ethertype=0x88B5):
    f = dst + src + struct.pack(">H", ethertype) + payload
    return f + bytes(max(0, 60 - len(f)))


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(16 << 20)
    yield m
    m.close()


@pytest.fixture
def io():
    t = IoThread("net-test")
    t.start()
    yield t
    t.close()


class Rig:
    def __init__(self, mem, io, tap=None, features=None, mac=MAC, init=True):
        self.tap = tap or FakeTap()
        self.dev = N.Net(self.tap, mac, id="net0")
        self.irq = M.CountingIrq()
        self.t = M.MmioTransport(self.dev, mem, self.irq, iothread=io)
        self.d = MmioDriver(self.t, mem)
        self.mem = mem
        self.io = io
        if init:
            if features is None:
                features = bit(VIRTIO_F_VERSION_1) | bit(N.VIRTIO_NET_F_MAC)
            self.d.init(features)
            self.rx, self.tx = self.d.queues

    def post_rx(self, n=1, size=2048):
        heads = []
        for _ in range(n):
            head, addrs = self.rx.add_chain([(size, True)])
            heads.append((head, addrs[0]))
        return heads

    def send(self, payload, hdr=bytes(HDR)):
        head, _ = self.tx.add_chain([(hdr, False), (payload, False)])
        self.d.kick(1)
        return head

    def sync(self):
        self.io.sync()

    def close(self):
        self.t.close()
        self.tap.close_peer()


@pytest.fixture
def rig(mem, io):
    r = Rig(mem, io)
    yield r
    r.close()


# -- configuration -------------------------------------------------------------------------
def test_features_and_config(mem, io):
    r = Rig(mem, io, init=False)
    try:
        f = r.d.device_features()
        for b in (VIRTIO_F_VERSION_1, N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_STATUS,
                  N.VIRTIO_NET_F_MRG_RXBUF, N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM,
                  N.VIRTIO_NET_F_HOST_TSO4, N.VIRTIO_NET_F_HOST_TSO6,
                  N.VIRTIO_NET_F_GUEST_TSO4, N.VIRTIO_NET_F_GUEST_TSO6, VIRTIO_RING_F_EVENT_IDX):
            assert f & bit(b), b
        assert not f & bit(N.VIRTIO_NET_F_CTRL_VQ)
        cfg = r.t.read(M.CONFIG_SPACE, 8) + r.t.read(M.CONFIG_SPACE + 8, 2)
        assert cfg[:6] == MAC
        assert struct.unpack("<H", cfg[6:8])[0] == N.VIRTIO_NET_S_LINK_UP
        assert r.t.read(M.CONFIG_SPACE + 2, 1) == MAC[2:3]
        assert r.t.read(M.REG_DEVICE_ID, 4) == struct.pack("<I", 1)
        assert len(r.t.queues) == 2
        r.t.write(M.CONFIG_SPACE, b"\x02")          # the MAC is read-only with VERSION_1
        assert r.t.read(M.CONFIG_SPACE, 1) == MAC[:1]
    finally:
        r.close()


def test_no_offloads_without_vnet_header(mem, io):
    for tap in (FakeTap(vnet_hdr=False), FakeTap(vnet_hdr=True, offloads_supported=False)):
        r = Rig(mem, io, tap=tap, init=False)
        try:
            f = r.d.device_features()
            assert not f & N.OFFLOAD_FEATURES
            assert f & bit(N.VIRTIO_NET_F_MRG_RXBUF) and f & bit(N.VIRTIO_NET_F_MAC)
        finally:
            r.close()


def test_parse_mac():
    assert N.parse_mac("52:54:00:AB:cd:01", "x") == bytes.fromhex("525400abcd01")
    for bad in ("52:54:00:ab:cd", "52-54-00-ab-cd-ef", "zz:54:00:ab:cd:ef", "", "52:54:00:ab:cd:ef:00"):
        with pytest.raises(ConfigError, match="invalid mac"):
            N.parse_mac(bad, "-device virtio-net-device,id=n")
    with pytest.raises(ConfigError, match="multicast"):
        N.parse_mac("01:00:5e:00:00:01", "x")
    with pytest.raises(ConfigError, match="all zeros"):
        N.parse_mac("00:00:00:00:00:00", "x")


def test_default_mac_is_deterministic_and_local():
    a, b = N.default_mac("net0"), N.default_mac("net1")
    assert a == N.default_mac("net0") and a != b
    assert a[:3] == b"\x52\x54\x00" and not a[0] & 1 and a[0] & 2
    assert N.format_mac(a).count(":") == 5


# -- transmit ------------------------------------------------------------------------------
def test_tx_frame_reaches_the_tap_with_header(rig):
    f = frame(b"SVGUEST-NET-PING")
    head = rig.send(f)
    got = rig.tap.peer.recv(4096)
    assert got == bytes(HDR) + f
    assert wait_until(lambda: rig.tx.used_idx() == 1)
    assert rig.tx.get_used() == [(head, 0)]
    assert rig.irq.count >= 1


def test_tx_without_vnet_header_strips_it(mem, io):
    r = Rig(mem, io, tap=FakeTap(vnet_hdr=False))
    try:
        f = frame(b"x" * 100)
        # header split over two descriptors, frame over two more
        head, _ = r.tx.add_chain([(bytes(4), False), (bytes(8), False),
                                  (f[:20], False), (f[20:], False)])
        r.d.kick(1)
        assert r.tap.peer.recv(4096) == f
        assert wait_until(lambda: r.tx.used_idx() == 1)
    finally:
        r.close()


def test_tx_many_frames_in_order(rig):
    for i in range(40):
        rig.tx.add_chain([(bytes(HDR), False), (frame(b"n%03d" % i), False)])
    rig.d.kick(1)
    for i in range(40):
        assert rig.tap.peer.recv(4096)[HDR + 14:HDR + 18] == b"n%03d" % i
    assert wait_until(lambda: rig.tx.used_idx() == 40)
    assert rig.dev.tx_frames == 40


def test_tx_short_chain_is_dropped_not_fatal(rig):
    rig.tx.add_chain([(bytes(HDR), False)])       # header only
    rig.d.kick(1)
    assert wait_until(lambda: rig.tx.used_idx() == 1)
    assert rig.dev.tx_dropped == 1
    assert not rig.d.status & STATUS_DEVICE_NEEDS_RESET
    rig.send(frame(b"after"))
    assert b"after" in rig.tap.peer.recv(4096)


# -- receive -------------------------------------------------------------------------------
def test_rx_frame_reaches_the_guest(rig):
    (head, addr), = rig.post_rx(1)
    rig.d.kick(0)
    f = frame(b"SVGUEST-NET-PONG", src=b"\x02" * 6, dst=MAC)
    hdr = bytes([1, 0]) + bytes(8) + b"\xee\xee"        # flags set, num_buffers garbage
    rig.tap.peer.send(hdr + f)
    assert wait_until(lambda: rig.rx.used_idx() == 1)
    assert rig.rx.get_used() == [(head, HDR + len(f))]
    got = rig.mem.read(addr, HDR + len(f))
    assert got[:HDR] == bytes(10) + b"\x01\x00"          # flags zeroed (no GUEST_CSUM), 1 buffer
    assert got[HDR:] == f
    assert rig.irq.count >= 1


def test_rx_keeps_flags_with_guest_csum(mem, io):
    feats = bit(VIRTIO_F_VERSION_1) | bit(N.VIRTIO_NET_F_GUEST_CSUM) | bit(N.VIRTIO_NET_F_CSUM)
    r = Rig(mem, io, features=feats)
    try:
        (head, addr), = r.post_rx(1)
        r.d.kick(0)
        hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 16, 0)
        r.tap.peer.send(hdr + frame(b"csum"))
        assert wait_until(lambda: r.rx.used_idx() == 1)
        assert r.mem.read(addr, HDR) == struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 16, 1)
        assert r.tap.offloads == T.TUN_F_CSUM
    finally:
        r.close()


def test_rx_without_vnet_header_adds_one(mem, io):
    r = Rig(mem, io, tap=FakeTap(vnet_hdr=False))
    try:
        (head, addr), = r.post_rx(1)
        r.d.kick(0)
        f = frame(b"plain")
        r.tap.peer.send(f)
        assert wait_until(lambda: r.rx.used_idx() == 1)
        assert r.rx.get_used() == [(head, HDR + len(f))]
        assert r.mem.read(addr, HDR + len(f)) == bytes(10) + b"\x01\x00" + f
    finally:
        r.close()


def test_rx_split_buffer(rig):
    # header and frame in separate device-writable descriptors (as Linux's big-packets mode)
    head, addrs = rig.rx.add_chain([(HDR, True), (1500, True)])
    rig.d.kick(0)
    f = frame(b"split" * 50)
    rig.tap.peer.send(bytes(HDR) + f)
    assert wait_until(lambda: rig.rx.used_idx() == 1)
    assert rig.rx.get_used() == [(head, HDR + len(f))]
    assert rig.mem.read(addrs[0], HDR) == bytes(10) + b"\x01\x00"
    assert rig.mem.read(addrs[1], len(f)) == f


def test_rx_back_pressure_keeps_frames_in_the_tap(rig):
    rig.sync()
    for i in range(3):
        rig.tap.peer.send(bytes(HDR) + frame(b"bp%d" % i))
    time.sleep(0.05)
    rig.sync()
    assert rig.dev._watching == 0              # no buffers: the tap fd is not watched
    assert rig.tap.queued() and rig.rx.used_idx() == 0
    bufs = rig.post_rx(2)
    rig.d.kick(0)
    assert wait_until(lambda: rig.rx.used_idx() == 2)
    time.sleep(0.05)
    rig.sync()
    assert rig.rx.used_idx() == 2 and rig.tap.queued() and rig.dev._watching == 0
    more = rig.post_rx(2)
    rig.d.kick(0)
    assert wait_until(lambda: rig.rx.used_idx() == 3)
    addrs = [a for _, a in bufs + more]
    for i in range(3):
        assert rig.mem.read(addrs[i] + HDR + 14, 3) == b"bp%d" % i
    assert wait_until(lambda: rig.dev._watching != 0)   # a buffer is left: watching for more
    assert not rig.tap.queued()
    assert rig.dev.rx_dropped == 0


def test_rx_burst(rig):
    rig.post_rx(200)
    rig.d.kick(0)
    for i in range(150):
        rig.tap.peer.send(bytes(HDR) + frame(b"burst%03d" % i))
    assert wait_until(lambda: rig.rx.used_idx() == 150)
    assert rig.dev.rx_frames == 150 and rig.dev.rx_dropped == 0


def test_rx_too_small_buffer_drops_frame_without_mrg(rig):
    small = rig.post_rx(1, size=200)
    rig.d.kick(0)
    rig.tap.peer.send(bytes(HDR) + frame(b"L" * 500))
    assert wait_until(lambda: rig.dev.rx_dropped == 1)
    assert rig.rx.used_idx() == 0
    rig.tap.peer.send(bytes(HDR) + frame(b"fits"))
    assert wait_until(lambda: rig.rx.used_idx() == 1)
    assert rig.rx.get_used() == [(small[0][0], HDR + 60)]


def test_rx_mergeable_buffers(mem, io):
    feats = bit(VIRTIO_F_VERSION_1) | bit(N.VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX)
    r = Rig(mem, io, features=feats)
    try:
        bufs = r.post_rx(2, size=100)
        r.d.kick(0)
        payload = bytes(range(256)) + bytes(range(20))      # frame = 14 + 276 = 290 bytes
        f = frame(payload)
        r.tap.peer.send(bytes(HDR) + f)                     # 302 bytes: needs 4 buffers
        assert wait_until(lambda: r.dev._pending is not None)
        assert r.rx.used_idx() == 0                         # held: only 2 buffers
        st = r.dev.save()
        assert st.pending_rx[HDR:] == f
        bufs += r.post_rx(1, size=100)
        r.d.kick(0)
        time.sleep(0.05)
        r.sync()
        assert r.rx.used_idx() == 0                         # 3 are still too few
        bufs += r.post_rx(3, size=100)
        r.d.kick(0)
        assert wait_until(lambda: r.rx.used_idx() == 4)
        used = r.rx.get_used()
        assert [u[0] for u in used] == [h for h, _ in bufs[:4]]
        assert [u[1] for u in used] == [100, 100, 100, 2]
        data = b"".join(r.mem.read(a, ln) for (_, a), (_, ln) in zip(bufs, used))
        assert data[:HDR] == bytes(10) + struct.pack("<H", 4)
        assert data[HDR:] == f
        assert r.dev.save().pending_rx == b""
        # a small frame then fits in one buffer
        r.tap.peer.send(bytes(HDR) + frame(b"tiny"))
        assert wait_until(lambda: r.rx.used_idx() == 5)
        assert r.mem.read(bufs[4][1], HDR)[10:] == b"\x01\x00"
    finally:
        r.close()


def test_rx_waits_for_driver_ok_and_reset_stops(mem, io):
    r = Rig(mem, io, init=False)
    try:
        r.tap.peer.send(bytes(HDR) + frame(b"early"))
        time.sleep(0.05)
        r.sync()
        assert r.dev._watching == 0 and r.tap.queued()
        r.d.init(bit(VIRTIO_F_VERSION_1))
        r.rx, r.tx = r.d.queues
        r.post_rx(1)
        r.d.kick(0)
        assert wait_until(lambda: r.rx.used_idx() == 1)
        r.post_rx(1)
        r.d.kick(0)
        r.sync()
        assert wait_until(lambda: r.dev._watching)      # the kick is handled asynchronously
        r.d.wr(M.REG_STATUS, 0)                   # reset
        r.sync()
        assert r.dev._watching == 0
    finally:
        r.close()


def test_offloads_follow_guest_features(mem, io):
    feats = (bit(VIRTIO_F_VERSION_1) | bit(N.VIRTIO_NET_F_GUEST_CSUM) |
             bit(N.VIRTIO_NET_F_GUEST_TSO4) | bit(N.VIRTIO_NET_F_GUEST_TSO6))
    r = Rig(mem, io, features=feats)
    try:
        assert r.tap.offloads == T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO6
        r.d.wr(M.REG_STATUS, 0)
        assert r.tap.offloads == 0
    finally:
        r.close()
    assert N.guest_offloads(bit(N.VIRTIO_NET_F_GUEST_TSO4)) == 0   # TSO needs GUEST_CSUM


# -- snapshot ---------------------------------------------------------------------------------
def test_drain_sends_queued_tx_and_stops_watching(rig):
    rig.post_rx(1)
    rig.d.kick(0)
    rig.sync()
    assert wait_until(lambda: rig.dev._watching)      # the kick is handled asynchronously
    with rig.t._lock:
        rig.t._paused = True        # a kick now is only remembered, as during a snapshot
    for i in range(3):
        rig.tx.add_chain([(bytes(HDR), False), (frame(b"d%d" % i), False)])
    rig.d.kick(1)
    rig.sync()
    assert rig.tx.used_idx() == 0
    rig.t.drain()
    assert rig.tx.used_idx() == 3
    assert [rig.tap.peer.recv(4096)[HDR + 14:HDR + 16] for _ in range(3)] == [b"d0", b"d1", b"d2"]
    assert rig.dev._watching == 0
    rig.tap.peer.send(bytes(HDR) + frame(b"while paused"))
    time.sleep(0.05)
    rig.sync()
    assert rig.rx.used_idx() == 0
    rig.t.resume()
    assert wait_until(lambda: rig.rx.used_idx() == 1)


@pytest.mark.parametrize("device_first", [False, True])
def test_state_roundtrip_and_restore_on_another_tap(mem, io, device_first):
    feats = bit(VIRTIO_F_VERSION_1) | bit(N.VIRTIO_NET_F_MRG_RXBUF) | bit(N.VIRTIO_NET_F_GUEST_CSUM)
    r = Rig(mem, io, features=feats)
    try:
        r.post_rx(1, size=64)
        r.d.kick(0)
        f = frame(b"P" * 100)
        r.tap.peer.send(bytes(HDR) + f)
        assert wait_until(lambda: r.dev._pending is not None)
        r.t.drain()
        st = r.dev.save()
        assert st.mac == N.format_mac(MAC) and st.offloads == T.TUN_F_CSUM
        assert st.pending_rx[HDR:] == f
        back = roundtrip(st)
        assert back == st
        tst = roundtrip(r.t.save())
    finally:
        r.close()
    # the clone: same memory (the guest's rings), a different tap
    other = FakeTap(name="othertap")
    c = Rig(mem, io, tap=other, init=False)
    try:
        if device_first:
            c.dev.restore(back)
            c.t.restore(tst)
        else:
            c.t.restore(tst)           # the order of devices.setup.VirtioSlot.restore
            c.dev.restore(back)
        assert c.dev.save() == back
        assert other.offloads == T.TUN_F_CSUM
        c.t.resume_after_restore()
        rxq = c.t.queues[0]
        # give the driver's ring more room: post buffers the way the old driver would
        from virtio_driver import MockDriverQueue, Allocator
        dq = MockDriverQueue.__new__(MockDriverQueue)
        dq.mem, dq.size, dq.alloc = mem, rxq.size, Allocator(0x800000)
        dq.desc, dq.avail, dq.used = rxq.desc_table, rxq.avail_ring, rxq.used_ring
        dq.avail_idx, dq.used_seen, dq.free = rxq.next_avail + 1, 0, 10
        for _ in range(2):
            dq.add_chain([(64, True)])
        c.d.kick(0)
        assert wait_until(lambda: mem.read_u16(rxq.used_ring + 2) == 2)   # 126 bytes: 2 of 64
        assert c.dev.save().pending_rx == b""
        other.peer.send(bytes(HDR) + frame(b"on the new tap"))
        dq.add_chain([(2048, True)])
        c.d.kick(0)
        assert wait_until(lambda: mem.read_u16(rxq.used_ring + 2) == 4)
    finally:
        c.close()


def test_restore_refuses_other_mac_and_bad_state(mem, io):
    r = Rig(mem, io, init=False)
    try:
        good = r.dev.save()
        assert good.pending_rx == b"" and good.offloads == 0
        with pytest.raises(SnapshotError, match="mac 52:54:00:ab:cd:ef differs.*52:54:00:00:00:01"):
            r.dev.restore(N.NetState(mac="52:54:00:00:00:01", offloads=0, pending_rx=b""))
        with pytest.raises(SnapshotError, match="pending frame"):
            r.dev.restore(N.NetState(mac=good.mac, offloads=0, pending_rx=b"short"))
        r.dev.restore(good)
    finally:
        r.close()
    r = Rig(mem, io, tap=FakeTap(vnet_hdr=False), init=False)
    try:
        with pytest.raises(SnapshotError, match="no vnet header"):
            r.dev.restore(N.NetState(mac=N.format_mac(MAC), offloads=T.TUN_F_CSUM, pending_rx=b""))
    finally:
        r.close()


def test_tap_gone_is_contained(rig):
    rig.post_rx(1)
    rig.d.kick(0)
    rig.sync()
    rig.tap.close_peer()           # EOF on the fake: reads return 0
    rig.send(frame(b"x"))          # write fails (EPIPE): dropped
    assert wait_until(lambda: rig.tx.used_idx() == 1)
    assert rig.dev.tx_dropped == 1
    assert not rig.d.status & STATUS_DEVICE_NEEDS_RESET
    rig.tap.peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)   # for close()


# -- create_net -------------------------------------------------------------------------------
def _cfg(netdev, devices):
    cfg = VmConfig()
    cfg.netdevs[netdev.id] = netdev
    cfg.devices = devices
    return cfg


def test_create_net_errors():
    dev = DeviceConfig("virtio-net-device", "net0", {"netdev": "n0", "mac": "52:54:00:zz:00:01"})
    with pytest.raises(ConfigError, match=r"virtio-net-device,id=net0: invalid mac '52:54:00:zz:00:01'"):
        N.create_net(_cfg(NetdevConfig("n0", ifname="svtap0"), [dev]), dev)
    dev = DeviceConfig("virtio-net-device", "net0", {"netdev": "n0"})
    with pytest.raises(DeviceError, match="netdev n0: vhost-net is not supported: /dev/vhost-net"):
        N.create_net(_cfg(NetdevConfig("n0", ifname="svtap0", vhost=True), [dev]), dev)
    d2 = DeviceConfig("virtio-net-device", "net1", {"netdev": "n0"})
    with pytest.raises(ConfigError, match="netdev n0 is used by more than one device"):
        N.create_net(_cfg(NetdevConfig("n0", ifname="svtap0"), [dev, d2]), dev)
    with pytest.raises(DeviceError, match="netdev n0: fd 1017 is not open"):
        N.create_net(_cfg(NetdevConfig("n0", fds=[1017]), [dev]), dev)


# -- the tap backend on real fds --------------------------------------------------------------
def test_from_fd_rejects_what_is_not_a_tap(tmp_path):
    r, w = os.pipe()
    try:
        with pytest.raises(DeviceError, match=f"netdev n0: fd {r} is not a tap device .not a character"):
            T.Tap.from_fd("n0", r)
    finally:
        os.close(r)
        os.close(w)
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(DeviceError, match=f"fd {fd} is not a tap device"):
            T.Tap.from_fd("n0", fd)
    finally:
        os.close(fd)
    if not os.access(T.TUN_PATH, os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/net/tun")
    fd = os.open(T.TUN_PATH, os.O_RDWR)
    try:
        with pytest.raises(DeviceError, match="is /dev/net/tun but not attached to a tap"):
            T.Tap.from_fd("n0", fd)
    finally:
        os.close(fd)


def test_open_rejects_bad_names():
    for name in ("", "a" * 16, "a/b"):
        with pytest.raises(DeviceError, match="not a valid interface name"):
            T.Tap.open("n0", name)




def _need_netns():
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace needs root")
    if not os.access(T.TUN_PATH, os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/net/tun")
    if subprocess.run(["ip", "-V"], capture_output=True).returncode != 0:
        pytest.skip("no ip command")


@pytest.fixture
def netns():
    _need_netns()
    name = f"svnu-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1"], capture_output=True)
    yield name
    subprocess.run(["ip", "netns", "del", name])


def test_real_tap_open_attach_and_errors(netns):
    def body():
        tap = T.Tap.open("n0", "svtap0")          # created (we have CAP_NET_ADMIN)
        try:
            assert tap.ifname == "svtap0" and tap.vnet_hdr and tap.offloads_supported
            tap.set_offload(T.TUN_F_CSUM | T.TUN_F_TSO4)
            assert tap.readv([bytearray(100)]) is None        # non-blocking, empty
            with pytest.raises(DeviceError, match="tap svtap0 is in use by another process"):
                T.Tap.open("n1", "svtap0")
            # an inherited fd of the same tap: vnet header detected
            dup = os.dup(tap.fd)
            other = T.Tap.from_fd("n2", dup)
            assert other.ifname == "svtap0" and other.vnet_hdr
            other.close()
            with pytest.raises(DeviceError, match="lo is not a tap device"):
                T.Tap.open("n3", "lo")
        finally:
            tap.close()
        # a tap without vnet headers, handed over as an fd
        fd = os.open(T.TUN_PATH, os.O_RDWR)
        import fcntl
        fcntl.ioctl(fd, T.TUNSETIFF, T._ifreq("svtap1", T.IFF_TAP | T.IFF_NO_PI))
        plain = T.Tap.from_fd("n4", fd)
        assert not plain.vnet_hdr and not plain.offloads_supported
        plain.close()
        fd = os.open(T.TUN_PATH, os.O_RDWR)
        fcntl.ioctl(fd, T.TUNSETIFF, T._ifreq("svtun0", T.IFF_TUN | T.IFF_NO_PI))
        try:
            with pytest.raises(DeviceError, match="is a tun device .svtun0., not a tap"):
                T.Tap.from_fd("n5", fd)
        finally:
            os.close(fd)
        fd = os.open(T.TUN_PATH, os.O_RDWR)
        fcntl.ioctl(fd, T.TUNSETIFF, T._ifreq("svtap2", T.IFF_TAP))
        try:
            if T._sysfs_tun_flags("svtap2") is not None:   # sysfs mounted for this netns
                with pytest.raises(DeviceError, match="without IFF_NO_PI"):
                    T.Tap.from_fd("n6", fd)
        finally:
            os.close(fd)
    in_netns(netns, body)


def test_multi_queue_fds_use_the_first_queue(netns):
    import fcntl

    def body():
        fds = []
        for _ in range(2):
            fd = os.open(T.TUN_PATH, os.O_RDWR)
            fcntl.ioctl(fd, T.TUNSETIFF, T._ifreq("svmq0", T.IFF_TAP | T.IFF_NO_PI |
                                                  T.IFF_VNET_HDR | T.IFF_MULTI_QUEUE))
            fds.append(fd)
        tap = T.Tap.from_fds("n0", fds)
        try:
            assert tap.fd == fds[0] and tap.vnet_hdr
            with pytest.raises(OSError):
                os.fstat(fds[1])                  # the extra queue was closed
            # and the VMM can open the same multi-queue tap by name
            tap2 = T.Tap.open("n1", "svmq0")
            tap2.close()
        finally:
            tap.close()
    in_netns(netns, body)


def test_from_fds_never_closes_what_is_not_its_tap(netns):
    """The extra queues are closed: a number that is no queue of the tap (a descriptor
    the VMM uses for itself) must be refused, with every fd left open."""
    import fcntl

    def body():
        fd = os.open(T.TUN_PATH, os.O_RDWR)
        fcntl.ioctl(fd, T.TUNSETIFF, T._ifreq("svmq1", T.IFF_TAP | T.IFF_NO_PI | T.IFF_MULTI_QUEUE))
        r, w = os.pipe()
        try:
            with pytest.raises(DeviceError, match=f"fd {r} is not a queue of tap svmq1"):
                T.Tap.from_fds("n0", [fd, r])
            with pytest.raises(DeviceError, match="name a descriptor more than once"):
                T.Tap.from_fds("n0", [fd, fd])
            for still_open in (fd, r, w):
                os.fstat(still_open)
        finally:
            for x in (fd, r, w):
                os.close(x)
    in_netns(netns, body)


# -- hot-replace --------------------------------------------------------------------------------
def test_empty_slot_then_replace_backend(mem, io):
    dev = N.Net.empty(id="slot4")
    irq = M.CountingIrq()
    t = M.MmioTransport(dev, mem, irq, iothread=io)
    d = MmioDriver(t, mem)
    taps = []
    try:
        f = d.device_features()
        assert f & N.OFFLOAD_FEATURES and f & bit(N.VIRTIO_NET_F_STATUS)
        assert t.read(M.CONFIG_SPACE, 8) == bytes(6) + b"\0\0"            # no MAC, link down
        assert dev.save() == N.NetState(mac="", offloads=0, pending_rx=b"")
        d.init(bit(VIRTIO_F_VERSION_1) | bit(N.VIRTIO_NET_F_STATUS))
        rx, tx = d.queues
        tx.add_chain([(bytes(HDR), False), (frame(b"nowhere"), False)])
        d.kick(1)
        assert wait_until(lambda: tx.used_idx() == 1)                      # dropped, link down
        head, addrs = rx.add_chain([(2048, True)])
        d.kick(0)
        io.sync()
        with pytest.raises(DeviceError, match="has no vnet header support"):
            t.replace_backend(N.Net(FakeTap(vnet_hdr=False), MAC, id="x"))
        tap = FakeTap()
        taps.append(tap)
        gen = t.read(M.REG_CONFIG_GENERATION, 4)
        t.replace_backend(N.Net(tap, MAC, id="net1"))
        assert t.read(M.CONFIG_SPACE, 8) == MAC + b"\x01\x00"
        assert t.read(M.REG_CONFIG_GENERATION, 4) != gen
        assert t.interrupt_status & M.INT_CONFIG_CHANGE
        tap.peer.send(bytes(HDR) + frame(b"plugged"))
        assert wait_until(lambda: rx.used_idx() == 1)
        assert mem.read(addrs[0] + HDR + 14, 7) == b"plugged"
        tx.add_chain([(bytes(HDR), False), (frame(b"out"), False)])
        d.kick(1)
        assert b"out" in tap.peer.recv(4096)
        assert dev.save().mac == N.format_mac(MAC)
        t.replace_backend(None)                                          # device_del
        assert tap.fd == -1 and dev._watching == 0
        assert t.read(M.CONFIG_SPACE, 8) == bytes(8)
    finally:
        t.close()
        for tp in taps:
            tp.close_peer()


def test_real_tap_frames_and_tap_removed(netns, mem, io):
    """A real tap: frames both ways through the kernel, then the tap disappears under us."""
    def setup():
        tap = T.Tap.open("n0", "svtap9")
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "svtap9", "up"], check=True)
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        s.bind(("svtap9", 0x88B5))
        return tap, s
    tap, sock = in_netns(netns, setup)
    sock.settimeout(5)
    dev = N.Net(tap, MAC, id="net0")
    t = M.MmioTransport(dev, mem, M.CountingIrq(), iothread=io)
    d = MmioDriver(t, mem)
    try:
        d.init(bit(VIRTIO_F_VERSION_1))
        rx, tx = d.queues
        tx.add_chain([(bytes(HDR), False), (frame(b"to-host"), False)])
        d.kick(1)
        while True:
            data, addr = sock.recvfrom(4096)
            if addr[2] != 4:                       # not our own outgoing frames
                break
        assert data == frame(b"to-host")
        head, addrs = rx.add_chain([(2048, True)])
        d.kick(0)
        sock.send(MAC + b"\x02" * 6 + b"\x88\xb5" + b"to-guest" + bytes(38))
        assert wait_until(lambda: rx.used_idx() == 1)
        assert mem.read(addrs[0] + HDR + 14, 8) == b"to-guest"
        rx.add_chain([(2048, True)])
        d.kick(0)
        io.sync()
        assert wait_until(lambda: dev._watching)      # the kick is handled asynchronously
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "del", "svtap9"], check=True)
        # EPOLLERR on the detached fd: the device notices, stops watching, does not spin
        assert wait_until(lambda: dev._tap_dead)
        tx.add_chain([(bytes(HDR), False), (frame(b"lost"), False)])
        d.kick(1)
        assert wait_until(lambda: tx.used_idx() == 2)
        assert dev._watching == 0
        assert not d.status & STATUS_DEVICE_NEEDS_RESET
    finally:
        t.close()
        sock.close()


def test_missing_dev_net_tun(monkeypatch, tmp_path):
    monkeypatch.setattr(T, "TUN_PATH", str(tmp_path / "tun"))
    with pytest.raises(DeviceError, match=r"netdev n0: .*/tun does not exist \(is the tun module "
                                          r"loaded\?\); cannot open tap svtap0"):
        T.Tap.open("n0", "svtap0")


def test_tx_batches_and_event_idx(mem, io, monkeypatch):
    monkeypatch.setattr(N, "TX_BATCH", 16)        # 40 frames: three turns on the I/O thread
    r = Rig(mem, io, features=bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX))
    try:
        for i in range(40):
            r.tx.add_chain([(bytes(HDR), False), (frame(b"b%03d" % i), False)])
        r.d.kick(1)
        got = [r.tap.peer.recv(4096)[HDR + 14:HDR + 18] for _ in range(40)]
        assert got == [b"b%03d" % i for i in range(40)]
        assert wait_until(lambda: r.tx.used_idx() == 40)
        # the device asks for a kick at the next buffer the driver adds
        assert wait_until(lambda: r.tx.avail_event() == 40)
    finally:
        r.close()


# -- offloads through a real tap ------------------------------------------------------------------
PACKET_VNET_HDR = 15
SOL_PACKET = 263


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp_gso_frame(dst_mac, src_mac, payload_len=3000):
    """An IPv4/TCP frame whose TCP checksum is left partial (CHECKSUM_PARTIAL style)."""
    payload = bytes((i * 7) & 0xFF for i in range(payload_len))
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    tcp_len = 20 + payload_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _csum(ip)) + ip[12:]
    pseudo = _csum(src + dst + struct.pack("!BBH", 0, 6, tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 1234, 5678, 1, 0, 5 << 4, 0x18, 65535, pseudo, 0)
    vnet = struct.pack("<BBHHHH", 1, 1, 54, 1000, 34, 16)    # NEEDS_CSUM, GSO_TCPV4, mss 1000
    return vnet, dst_mac + src_mac + b"\x08\x00" + ip + tcp + payload


@pytest.mark.parametrize("guest_tso", [True, False])
def test_real_tap_tso_both_ways(netns, mem, io, guest_tso):
    """Guest TSO frames reach the host stack as GSO packets; host GSO frames reach the guest
    whole when it negotiated GUEST_TSO4 (TUNSETOFFLOAD), segmented by the host otherwise."""
    def setup():
        tap = T.Tap.open("n0", "svtso0")
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "svtso0", "up"], check=True)
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.bind(("svtso0", 0x0800))
        return tap, s
    tap, sock = in_netns(netns, setup)
    sock.settimeout(5)
    feats = (bit(VIRTIO_F_VERSION_1) | bit(N.VIRTIO_NET_F_CSUM) | bit(N.VIRTIO_NET_F_HOST_TSO4) |
             bit(N.VIRTIO_NET_F_GUEST_CSUM))
    if guest_tso:
        feats |= bit(N.VIRTIO_NET_F_GUEST_TSO4)
    dev = N.Net(tap, MAC, id="net0")
    t = M.MmioTransport(dev, mem, M.CountingIrq(), iothread=io)
    d = MmioDriver(t, mem)
    try:
        d.init(feats)
        rx, tx = d.queues
        assert tap.offloads == T.TUN_F_CSUM | (T.TUN_F_TSO4 if guest_tso else 0)
        # guest -> host: one 3054-byte TSO frame
        vnet, f = tcp_gso_frame(b"\x02" * 6, MAC)
        tx.add_chain([(vnet + b"\0\0", False), (f, False)])
        d.kick(1)
        while True:
            data, addr = sock.recvfrom(65536)
            if addr[2] != 4:
                break
        flags, gso_type, _, gso_size, _, _ = struct.unpack("<BBHHHH", data[:10])
        assert (gso_type, gso_size, len(data) - 10) == (1, 1000, len(f))
        assert data[10:] == f
        # host -> guest: the same kind of frame injected into the tap
        bufs = [rx.add_chain([(65562, True)]) for _ in range(4)]
        d.kick(0)
        vnet, f = tcp_gso_frame(MAC, b"\x02" * 6)
        sock.send(vnet + f)
        if guest_tso:
            assert wait_until(lambda: rx.used_idx() == 1)
            (head, ln), = rx.get_used()
            hdr = mem.read(bufs[0][1][0], HDR)
            assert ln == HDR + len(f)
            assert struct.unpack("<BBHHHHH", hdr)[1:4:2] == (1, 1000)       # still one GSO frame
            assert mem.read(bufs[0][1][0] + HDR, len(f))[54:] == f[54:]
        else:
            assert wait_until(lambda: rx.used_idx() == 3)                   # segmented by the host
            used = rx.get_used()
            assert [ln for _, ln in used] == [HDR + 54 + 1000] * 3
            for (_, ln), (_, addrs) in zip(used, bufs):
                hdr = mem.read(addrs[0], HDR)
                assert hdr[1] == 0                                          # GSO_NONE
    finally:
        t.close()
        sock.close()
