"""virtio-blk batches: a kick's requests run in ring order, adjacent transfers merged into
one system call, each request with its own status; a bad chain mid-batch still resets.
Each runs with the C fast path (blk_native) and without it: the results must be equal."""

import errno
import os
import random
import struct

import pytest

from stratovirt_py.devices.virtio import blk as B
from stratovirt_py.devices.virtio import mmio as M
from stratovirt_py.devices.virtio import blk_native
from stratovirt_py.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from stratovirt_py.memory import GuestMemory

from test_virtio_blk import PATTERN, SECTORS, Disk, mem  # noqa: F401 (mem: a fixture)


def use_native(monkeypatch, mode):
    if mode == "native" and not blk_native.built():
        pytest.skip("the C fast path is not built")
    monkeypatch.setenv("STRATOVIRT_BLK_NATIVE", "on" if mode == "native" else "off")


@pytest.fixture(params=["python", "native"])
def disk(request, mem, tmp_path, monkeypatch):  # noqa: F811
    use_native(monkeypatch, request.param)
    path = tmp_path / "disk.img"
    path.write_bytes(PATTERN)
    dk = Disk(mem, str(path), direct=False)
    assert (dk.dev.native is not None) == (request.param == "native")
    yield dk.d, dk.q, str(path), dk
    dk.close()


def queue_req(dk, rtype, sector, out=b"", in_len=0):
    return dk.request(rtype, sector, out, in_len, kick=False, align=512)


class Syscalls:
    """Counts preadv/pwritev calls; optionally fails the ones covering several requests."""

    def __init__(self, monkeypatch, fail_merged_over=None):
        self.calls = []
        real_r, real_w = os.preadv, os.pwritev

        def wrap(name, real):
            def call(fd, views, offset):
                size = sum(len(v) for v in views)
                self.calls.append((name, offset, size))
                if fail_merged_over is not None and size > fail_merged_over:
                    raise OSError(errno.EIO, "merged transfer refused")
                return real(fd, views, offset)
            return call
        monkeypatch.setattr(os, "preadv", wrap("r", real_r))
        monkeypatch.setattr(os, "pwritev", wrap("w", real_w))


def test_adjacent_writes_and_reads_merge(disk, mem, monkeypatch):
    d, q, path, dk = disk
    sys = Syscalls(monkeypatch)
    writes = [queue_req(dk, B.VIRTIO_BLK_T_OUT, 4 + i, out=bytes([0xA0 + i]) * 512) for i in range(4)]
    reads = [queue_req(dk, B.VIRTIO_BLK_T_IN, 4 + i, in_len=512) for i in range(4)]
    d.kick(0)
    used = q.get_used()
    assert used == [(h, 1) for h, _ in writes] + [(h, 513) for h, _ in reads]
    assert sys.calls == ([] if dk.dev.native else [("w", 4 * 512, 2048), ("r", 4 * 512, 2048)])
    for i, (_, addrs) in enumerate(writes + reads):
        assert mem.read_u8(addrs[-1]) == 0
    for i, (_, addrs) in enumerate(reads):
        assert mem.read(addrs[1], 512) == bytes([0xA0 + i]) * 512   # the writes before it
    with open(path, "rb") as f:
        data = f.read()
    assert data[2048:4096] == b"".join(bytes([0xA0 + i]) * 512 for i in range(4))
    assert data[:2048] == PATTERN[:2048] and data[4096:] == PATTERN[4096:]


def test_gaps_types_and_refusals_split_groups(disk, mem, monkeypatch):
    d, q, _, dk = disk
    sys = Syscalls(monkeypatch)
    a = queue_req(dk, B.VIRTIO_BLK_T_IN, 0, in_len=512)
    b = queue_req(dk, B.VIRTIO_BLK_T_IN, 2, in_len=512)                    # a gap
    c = queue_req(dk, B.VIRTIO_BLK_T_IN, SECTORS, in_len=512)              # out of range
    e = queue_req(dk, B.VIRTIO_BLK_T_FLUSH, 0)
    f = queue_req(dk, B.VIRTIO_BLK_T_IN, 3, in_len=512)
    d.kick(0)
    assert [u[0] for u in q.get_used()] == [a[0], b[0], c[0], e[0], f[0]]
    assert [mem.read_u8(x[1][-1]) for x in (a, b, c, e, f)] == [0, 0, B.VIRTIO_BLK_S_IOERR, 0, 0]
    # The C path stops at the out-of-range request; Python takes it from there.
    assert [c_[1:] for c_ in sys.calls] == ([(1536, 512)] if dk.dev.native else
                                            [(0, 512), (1024, 512), (1536, 512)])
    assert mem.read(f[1][1], 512) == PATTERN[1536:2048]


def test_failed_merge_gives_each_request_its_own_status(disk, mem, monkeypatch):
    d, q, _, dk = disk
    dk.dev.native = None     # Python's merging is what this checks
    sys = Syscalls(monkeypatch, fail_merged_over=512)
    reqs = [queue_req(dk, B.VIRTIO_BLK_T_IN, i, in_len=512) for i in range(3)]
    d.kick(0)
    assert q.get_used() == [(h, 513) for h, _ in reqs]
    assert [mem.read_u8(a[-1]) for _, a in reqs] == [0, 0, 0]
    assert sys.calls[0] == ("r", 0, 1536) and len(sys.calls) == 4
    assert not d.status & STATUS_DEVICE_NEEDS_RESET


def test_bad_chain_mid_batch_completes_the_ones_before(disk, mem):
    d, q, path, dk = disk
    good = queue_req(dk, B.VIRTIO_BLK_T_OUT, 1, out=b"\x5A" * 512)
    q.add_chain([(b"\0" * 8, False), (1, True)])         # header too short
    late = queue_req(dk, B.VIRTIO_BLK_T_OUT, 2, out=b"\x6B" * 512)
    d.kick(0)
    assert d.status & STATUS_DEVICE_NEEDS_RESET
    assert q.get_used() == [(good[0], 1)]
    assert d.rd(M.REG_INTERRUPT_STATUS) == 3, "used buffer and configuration change"
    with open(path, "rb") as f:
        data = f.read()
    assert data[512:1024] == b"\x5A" * 512
    assert data[1024:1536] == PATTERN[1024:1536], "nothing after the bad chain runs"
    assert late and d.t.queues[0].next_avail == 2, "the bad chain was the last taken"


def test_failed_native_transfer_is_given_back(disk, mem, tmp_path):
    d, q, path, dk = disk
    rw_fd = dk.dev.fd
    dk.dev.fd = os.open(path, os.O_RDONLY)        # writes now fail with EBADF
    try:
        reqs = [queue_req(dk, B.VIRTIO_BLK_T_OUT, i, out=b"\x77" * 512) for i in range(2)]
        ok = queue_req(dk, B.VIRTIO_BLK_T_IN, 5, in_len=512)
        d.kick(0)
        assert q.get_used() == [(h, 1) for h, _ in reqs] + [(ok[0], 513)]
        assert [mem.read_u8(a[-1]) for _, a in reqs + [ok]] == [B.VIRTIO_BLK_S_IOERR] * 2 + [0]
        assert mem.read(ok[1][1], 512) == PATTERN[2560:3072]
        assert not d.status & STATUS_DEVICE_NEEDS_RESET
    finally:
        os.close(dk.dev.fd)
        dk.dev.fd = rw_fd


def _random_run(mode, monkeypatch, tmp_path, seed):
    """Random requests (good, refused and odd-shaped) in random batches; what the guest
    and the disk see afterwards."""
    use_native(monkeypatch, mode)
    rnd = random.Random(seed)
    path = tmp_path / f"{mode}.img"
    path.write_bytes(PATTERN)
    mem = GuestMemory.anonymous(8 << 20)
    dk = Disk(mem, str(path), direct=False)
    seen = []
    sector_run = 0
    try:
        for _ in range(30):
            chains = []
            for _ in range(rnd.randint(1, 12)):
                rtype = rnd.choice([B.VIRTIO_BLK_T_IN] * 6 + [B.VIRTIO_BLK_T_OUT] * 6 +
                                   [B.VIRTIO_BLK_T_FLUSH, B.VIRTIO_BLK_T_GET_ID, 77])
                odd = rnd.random() < 0.1       # mostly plain requests, in runs
                sector = rnd.choice([SECTORS - 1, SECTORS, 1 << 62] if odd else
                                    [rnd.randrange(SECTORS - 4), sector_run])
                size = rnd.choice([100, 1536] if odd else [512, 1024, 2048])
                sector_run = (sector + size // 512) % (SECTORS - 4)
                parts = rnd.choice([[0, size]] if odd else [[size], [size // 2, size - size // 2]])
                bufs = [(struct.pack("<IIQ", rtype, 0, sector), False)]
                for n in parts:
                    if rtype == B.VIRTIO_BLK_T_OUT:
                        bufs.append((bytes(rnd.randrange(256) for _ in range(n)), False))
                    elif rtype != B.VIRTIO_BLK_T_FLUSH:
                        bufs.append((n, True))
                bufs.append((2 if rnd.random() < 0.05 else 1, True))
                chains.append(dk.q.add_indirect(bufs) if rnd.random() < 0.3 else
                              dk.q.add_chain(bufs, align=rnd.choice([512, 8])))
            dk.d.kick(0)
            for head, len_ in dk.q.get_used():
                addrs = dict(chains)[head]
                seen.append((head, len_, b"".join(mem.read(a, 64) for a in addrs[1:])))
            dk.q.free = dk.q.free % dk.q.size
            dk.q.alloc.next = 0x100000
    finally:
        dk.close()
        mem.close()
    return seen, path.read_bytes()


def test_native_and_python_agree_on_random_requests(monkeypatch, tmp_path):
    if not blk_native.built():
        pytest.skip("the C fast path is not built")
    for seed in range(4):
        assert _random_run("native", monkeypatch, tmp_path, seed) == \
            _random_run("python", monkeypatch, tmp_path, seed), seed


def test_indirect_requests(disk, mem, monkeypatch):
    d, q, _, dk = disk
    sys = Syscalls(monkeypatch)
    reqs = [q.add_indirect([(struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 6 + i), False),
                            (512, True), (1, True)]) for i in range(2)]
    d.kick(0)
    assert q.get_used() == [(h, 513) for h, _ in reqs]
    assert [mem.read(a[1], 512) for _, a in reqs] == [PATTERN[3072:3584], PATTERN[3584:4096]]
    assert sys.calls == ([] if dk.dev.native else [("r", 3072, 1024)])
    # An indirect descriptor that also says NEXT is malformed: NEEDS_RESET either way.
    head, _ = q.add_indirect([(struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0), False),
                              (512, True), (1, True)])
    q.write_desc(head, q.alloc.alloc(48, 16), 48, 4 | 1, head)
    d.kick(0)
    assert d.status & STATUS_DEVICE_NEEDS_RESET
