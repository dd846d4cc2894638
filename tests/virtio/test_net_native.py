"""The virtio-net C fast path (net_native) against the Python data path it stands in for.

Random transmit and receive chains - plain ones, and the shapes the C side hands back
(empty descriptors, a split header, mixed directions, too many segments, indirect
tables, frames that do not fit) - run with the fast path and without it: what the
guest and the host see must be equal."""

import random

import pytest
from test_net_unit import HDR, FakeTap, Rig, mem, wait_until  # noqa: F401 (fixture)

from stratovirt_py.devices.iothread import IoThread
from stratovirt_py.devices.virtio import net as N
from stratovirt_py.devices.virtio import net_native
from stratovirt_py.devices.virtio.device import (STATUS_DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1,
                                                VIRTIO_RING_F_INDIRECT_DESC, bit)
from stratovirt_py.memory import GuestMemory

BASE = bit(VIRTIO_F_VERSION_1) | bit(N.VIRTIO_NET_F_MAC) | bit(VIRTIO_RING_F_INDIRECT_DESC)
MRG = bit(N.VIRTIO_NET_F_MRG_RXBUF)
CSUM = bit(N.VIRTIO_NET_F_GUEST_CSUM) | bit(N.VIRTIO_NET_F_CSUM)


def use_native(monkeypatch, mode):
    if mode == "native" and not net_native.built():
        pytest.skip("the C fast path is not built")
    monkeypatch.setenv("STRATOVIRT_NET_NATIVE", "on" if mode == "native" else "off")


def drain(sock):
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(70000))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(5)


def split(rnd, data):
    """``data`` cut into 1-4 pieces at random points, sometimes with an empty piece."""
    cuts = sorted(rnd.randrange(len(data) + 1) for _ in range(rnd.randrange(4)))
    pieces, at = [], 0
    for c in cuts + [len(data)]:
        pieces.append(data[at:c])
        at = c
    return [p for p in pieces if p or rnd.random() < 0.3] or [data]


def rx_shape(rnd):
    return rnd.choice([
        [2048], [2048], [1600], [12, 2036], [8, 2040], [0, 2048], [100], [600, 600, 600],
        [40] * 70, "indirect", "readable"])


def one_round(rnd, mem, io, vnet_hdr, features):
    r = Rig(mem, io, tap=FakeTap(vnet_hdr=vnet_hdr), features=features)
    seen = []
    try:
        for _ in range(rnd.randint(1, 12)):
            data = bytes(rnd.randrange(256) for _ in range(HDR + rnd.choice([0, 2, 60, 600, 1514])))
            bufs = [(p, False) for p in split(rnd, data)]
            if rnd.random() < 0.05:
                bufs.append((16, True))
            r.tx.add_indirect(bufs) if rnd.random() < 0.2 else r.tx.add_chain(bufs)
        r.d.kick(1)
        r.sync()
        seen.append(("tx", r.tx.get_used(), drain(r.tap.peer), r.dev.tx_frames, r.dev.tx_dropped))
        for _ in range(rnd.randint(0, 8)):
            n = rnd.choice([14, 60, 1514, 1514, 1900, 2100, 3000])
            r.tap.peer.send(bytes(rnd.randrange(256) for _ in range(n)))
        chains = {}
        for _ in range(rnd.randint(0, 8)):
            shape = rx_shape(rnd)
            if shape == "indirect":
                head, addrs = r.rx.add_indirect([(2048, True)])
                sizes = [2048]
            elif shape == "readable":
                head, addrs = r.rx.add_chain([(b"x" * 8, False), (2048, True)])
                addrs, sizes = addrs[1:], [2048]
            else:
                head, addrs = r.rx.add_chain([(n, True) for n in shape])
                sizes = shape
            chains[head] = list(zip(addrs, sizes))
        r.d.kick(0)
        r.sync()
        got = [(h, ln, b"".join(mem.read(a, n) for a, n in chains[h]))
               for h, ln in r.rx.get_used()]
        seen.append(("rx", got, r.dev.rx_frames, r.dev.rx_dropped, r.dev._pending,
                     r.t.status & STATUS_DEVICE_NEEDS_RESET, r.tap.queued()))
        return seen
    finally:
        r.close()


def random_run(mode, monkeypatch, seed):
    use_native(monkeypatch, mode)
    rnd = random.Random(seed)
    seen = []
    io = IoThread("net-native-test")
    io.start()
    try:
        for i in range(24):
            vnet_hdr = rnd.random() < 0.7
            features = BASE | (MRG if rnd.random() < 0.5 else 0) | \
                (CSUM if vnet_hdr and rnd.random() < 0.5 else 0)
            mem = GuestMemory.anonymous(16 << 20)
            try:
                seen.append(one_round(rnd, mem, io, vnet_hdr, features))
            finally:
                mem.close()
    finally:
        io.close()
    return seen


def test_native_and_python_agree_on_random_chains(monkeypatch):
    if not net_native.built():
        pytest.skip("the C fast path is not built")
    for seed in range(3):
        assert random_run("native", monkeypatch, seed) == random_run("python", monkeypatch, seed), seed


@pytest.mark.parametrize("mode", ["python", "native"])
def test_fast_path_is_used_only_when_allowed(mem, monkeypatch, mode):
    use_native(monkeypatch, mode)
    io = IoThread("net-native-test")
    io.start()
    r = Rig(mem, io)
    try:
        r.tx.add_chain([(bytes(HDR) + b"\xff" * 60, False)])
        r.d.kick(1)
        assert wait_until(lambda: r.tx.used_idx() == 1)
        r.sync()
        assert (r.dev._native is not None) == (mode == "native")
        assert r.dev.tx_frames == 1
    finally:
        r.close()
        io.close()


@pytest.mark.parametrize("mode", ["python", "native"])
def test_bad_chain_after_good_frames_needs_reset(mem, monkeypatch, mode):
    """The frames before a bad chain are sent; the bad one stops the device, not the VMM."""
    use_native(monkeypatch, mode)
    io = IoThread("net-native-test")
    io.start()
    r = Rig(mem, io)
    try:
        heads = [r.tx.add_chain([(bytes(HDR) + bytes([i]) * 60, False)])[0] for i in range(3)]
        bad, _ = r.tx.add_chain([(bytes(HDR) + b"\x00" * 60, False)])
        r.tx.write_desc(bad, 1 << 40, 72, 0, 0)          # outside guest RAM
        r.d.kick(1)
        r.sync()
        assert [f[HDR] for f in drain(r.tap.peer)] == [0, 1, 2]
        assert r.tx.get_used() == [(h, 0) for h in heads]
        assert r.t.status & STATUS_DEVICE_NEEDS_RESET
    finally:
        r.close()
        io.close()
