"""virtio-blk (virtio 1.x "Block Device"): a raw image file or block device, one queue.

Request: a 16-byte header {le32 type; le32 reserved; le64 sector} in device-readable
buffers, then data (readable for writes, writable for reads), then one writable status
byte (OK 0, IOERR 1, UNSUPP 2).  Host-side failures and out-of-range sectors answer
IOERR, unknown types UNSUPP; a malformed chain (header < 16 bytes, no status byte) is a
driver bug and puts the device in NEEDS_RESET.

The file is opened with O_DIRECT when ``direct`` (the default, as in StratoVirt); guest
buffers that are sector-aligned are read/written in place (``os.preadv``/``pwritev``,
which release the GIL), others go through a page-aligned bounce buffer.  An OFD lock
(write lock read-write, read lock read-only) keeps a second VMM off a drive in use.

``aio`` is accepted for compatibility (native, io_uring, threads, off); requests run
synchronously on the I/O thread whatever it says, a kick's worth at a time, adjacent
ones merged into one system call (``blk_batch.py``).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from ...logs import get_logger
from ...record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from .queue import Segment
    from typing import ClassVar, List, Optional, Tuple

from ...errors import DeviceError, SnapshotError
from .device import (COMMON_FEATURES, VIRTIO_ID_BLOCK, VirtioDevice, bit)
from .queue import DescriptorChain, QueueError, slice_segments

log = get_logger(__name__)

SECTOR_SIZE = 512
BOUNCE_CHUNK = 1 << 20   # unaligned requests are copied through at most this much at a time
IOV_MAX = 1024
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2
ID_BYTES = 20
MAX_DISCARD_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SECTORS = 1 << 22
DISCARD_SECTOR_ALIGNMENT = 8

VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")
# struct flock on x86_64: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad)
_FLOCK = "hhqqi4x"

def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes       # only a guest's discard or write-zeroes gets here
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@record(frozen=True)
class BlkState:
    VERSION: ClassVar[int] = 1
    path: str
    capacity: int      # 512-byte sectors
    serial: str        # "" when none
    readonly: bool

    FIELDS: ClassVar[dict] = {"path": ("str", 4096), "capacity": ("int", 0, 1 << 63),
                              "serial": ("str", 256), "readonly": ("bool",)}


class Blk(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_BLOCK
    NAME = "virtio-blk"
    QUEUE_SIZES = (QUEUE_SIZE,)
    header_struct = _HEADER

    def __init__(self, path: Optional[str], readonly: bool = False, direct: bool = True,
                 serial: Optional[str] = None, iops_total: Optional[int] = None,
                 aio: Optional[str] = None, id: Optional[str] = None):
        """``path=None`` makes an empty drive (capacity 0) for a hot-replaceable slot."""
        super().__init__(id)
        if aio not in (None, "native", "io_uring", "threads", "off"):
            raise DeviceError(f"drive {path}: unknown aio mode {aio!r} "
                              f"(use native, io_uring, threads or off)")
        if iops_total is not None and iops_total <= 0:
            raise DeviceError(f"drive {path}: throttling.iops-total must be positive")
        self.path = path or ""
        self.readonly = readonly
        self.direct = direct
        self.serial = serial or ""
        self.aio = aio
        if iops_total:
            from .throttle import TokenBucket
            self._bucket = TokenBucket(iops_total)
        else:
            self._bucket = None
        self._throttle_pending = False
        self.native = None            # the C fast path (blk_native), made at the first kick
        self._native_tried = False
        self._bounce: Optional[mmap.mmap] = None
        self.fd = -1
        self.size = self.capacity = 0
        self.align = SECTOR_SIZE
        self.can_punch = False
        if path:
            self.fd = self._open()
            try:
                self._lock_file()
                self.size = self._file_size()
                self.capacity = self.size // SECTOR_SIZE
                self.align = self._probe_alignment() if direct else SECTOR_SIZE
                self.can_punch = self._probe_punch_hole()
            except BaseException:
                os.close(self.fd)
                raise
        # Features are fixed for the device's life: a backend replaced later cannot
        # change what the driver negotiated (a read-only replacement refuses writes).
        self._offer_ro = self.readonly
        self._offer_discard = self.can_punch

    def replace_backend(self, new: Optional["Blk"]) -> None:
        """Hot-replace: take over ``new``'s open drive (or become empty with None)."""
        old_fd = self.fd
        if new is None:
            self.path, self.fd, self.size, self.capacity, self.serial = "", -1, 0, 0, ""
            self.readonly, self.align, self.can_punch, self._bucket = False, SECTOR_SIZE, False, None
        else:
            self.path, self.fd, self.size, self.capacity = new.path, new.fd, new.size, new.capacity
            self.readonly, self.direct, self.serial, self.aio = new.readonly, new.direct, new.serial, new.aio
            self.align, self.can_punch, self._bucket = new.align, new.can_punch, new._bucket
            new.fd = -1     # ownership moved here
            new.close()
        if old_fd >= 0:
            try:
                os.fdatasync(old_fd)
            except OSError as e:
                log.warning("%s: flushing the replaced drive failed: %s", self.id, e.strerror)
            os.close(old_fd)

    # -- opening the backend ------------------------------------------------------------
    def _open(self) -> int:
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
        if self.direct:
            flags |= os.O_DIRECT
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            raise DeviceError(f"drive file {self.path} does not exist") from None
        except PermissionError:
            mode = "read-only" if self.readonly else "read-write"
            raise DeviceError(f"cannot open drive file {self.path} {mode}: permission denied"
                              + ("" if self.readonly else " (use readonly=on?)")) from None
        except IsADirectoryError:
            raise DeviceError(f"drive file {self.path} is a directory") from None
        except OSError as e:
            if self.direct and e.errno == errno.EINVAL:
                raise DeviceError(
                    f"drive file {self.path}: its file system does not support O_DIRECT "
                    f"(direct=on is the default); use direct=off") from None
            raise DeviceError(f"cannot open drive file {self.path}: {e.strerror}") from None

    def _lock_file(self) -> None:
        ltype = fcntl.F_RDLCK if self.readonly else fcntl.F_WRLCK
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, ltype, os.SEEK_SET, 0, 0, 0))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DeviceError(f"drive file {self.path} is locked by another process "
                                  f"(is it in use by another VM?)") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                log.warning("drive file %s: cannot be locked (%s); continuing unlocked",
                            self.path, e.strerror)
                return
            raise DeviceError(f"cannot lock drive file {self.path}: {e.strerror}") from None

    def _file_size(self) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(self.fd, 0, os.SEEK_END)
        raise DeviceError(f"drive file {self.path} is neither a regular file nor a block device")

    def _probe_alignment(self) -> int:
        """The smallest alignment O_DIRECT accepts here (512 or 4096)."""
        if self.size == 0:
            return SECTOR_SIZE
        buf = self._bounce_buffer(4096)
        for align in (SECTOR_SIZE, 4096):
            try:
                os.preadv(self.fd, [memoryview(buf)[:align]], 0)
                return align
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise DeviceError(f"cannot read drive file {self.path}: {e.strerror}") from None
        raise DeviceError(f"drive file {self.path}: O_DIRECT reads fail; use direct=off")

    def _probe_punch_hole(self) -> bool:
        if self.readonly or not stat.S_ISREG(os.fstat(self.fd).st_mode):
            return False
        end = -(-self.size // 4096) * 4096
        try:  # past the end of the file: changes nothing
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, end, 4096)
            return True
        except OSError:
            return False

    def _bounce_buffer(self, size: int) -> mmap.mmap:
        if self._bounce is None or len(self._bounce) < size:
            if self._bounce is not None:
                self._bounce.close()
            size = max(size, 64 * 1024)
            self._bounce = mmap.mmap(-1, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        return self._bounce

    # -- what the transport asks ----------------------------------------------------------
    def features(self) -> int:
        f = COMMON_FEATURES | bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | \
            bit(VIRTIO_BLK_F_FLUSH)
        if self._offer_ro:
            f |= bit(VIRTIO_BLK_F_RO)
        else:
            f |= bit(VIRTIO_BLK_F_WRITE_ZEROES)
            if self._offer_discard:
                f |= bit(VIRTIO_BLK_F_DISCARD)
        return f

    def config(self) -> bytes:
        """struct virtio_blk_config, 60 bytes."""
        return struct.pack(
            "<QII HBB I BBHI BBH III II B3x",
            self.capacity, 0, SEG_MAX,
            0, 0, 0,                          # geometry
            self.align,                       # blk_size
            0, 0, 0, 0,                       # topology
            0, 0, 1,                          # writeback, unused, num_queues
            MAX_DISCARD_SECTORS, 1, DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS, 1,
            1 if self.can_punch else 0)       # write_zeroes_may_unmap

    def reset(self) -> None:
        super().reset()
        self._throttle_pending = False

    # -- the request queue (I/O thread) -------------------------------------------------------
    def process_queue(self, index: int) -> None:
        # The batch and C paths load on the first kick, after the guest runs.
        from .blk_batch import run_batch
        if not self._native_tried:
            from .blk_native import native_ring
            self.native = native_ring()
            self._native_tried = True
        q = self.queues[index]
        added = 0
        try:
            while True:
                while q.pending():
                    if self._bucket is None:
                        done, error = run_batch(self, q)
                        added += done
                        if error is not None:
                            raise error
                        continue
                    if not self._bucket.take():
                        self._throttle(index)
                        return
                    chain = q.pop()
                    q.add_used(chain.head, self.handle_request(chain))
                    added += 1
                if not q.enable_notification():
                    break
        finally:
            if added:
                self.signal_used(index)

    def _throttle(self, index: int) -> None:
        if self._throttle_pending:
            return
        self._throttle_pending = True

        def retry() -> None:
            self._throttle_pending = False
            if self.queues:
                self.process_queue(index)
        self.call_later(self._bucket.delay(), retry)

    def handle_request(self, chain: DescriptorChain) -> int:
        """Execute one request; returns the used length (bytes written, status included)."""
        if chain.readable_len < _HEADER.size:
            raise QueueError(f"virtio-blk request header is {chain.readable_len} bytes (< 16)")
        if chain.writable_len < 1:
            raise QueueError("virtio-blk request has no status byte")
        rtype, _, sector = _HEADER.unpack(chain.read(0, _HEADER.size))
        status_at = chain.writable_len - 1
        try:
            status, written = self._execute(rtype, sector, chain, status_at)
        except OSError as e:
            log.warning("%s: %s: request type %d at sector %d failed: %s",
                        self.id, self.path, rtype, sector, e.strerror or e)
            status, written = VIRTIO_BLK_S_IOERR, 0
        chain.write(status_at, bytes([status]))
        return written + 1

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return sector * SECTOR_SIZE + nbytes <= self.capacity * SECTOR_SIZE

    def _execute(self, rtype: int, sector: int, chain: DescriptorChain,
                 data_len: int) -> Tuple[int, int]:
        if rtype == VIRTIO_BLK_T_IN:
            if data_len % SECTOR_SIZE or not self._in_range(sector, data_len):
                return VIRTIO_BLK_S_IOERR, 0
            self._read(sector * SECTOR_SIZE, chain, data_len)
            return VIRTIO_BLK_S_OK, data_len
        if rtype == VIRTIO_BLK_T_OUT:
            nbytes = chain.readable_len - _HEADER.size
            if self.readonly or nbytes % SECTOR_SIZE or not self._in_range(sector, nbytes):
                return VIRTIO_BLK_S_IOERR, 0
            self._write(sector * SECTOR_SIZE, chain, nbytes)
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            if self.fd < 0:
                return VIRTIO_BLK_S_IOERR, 0
            if not self.readonly:
                os.fdatasync(self.fd)
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            n = min(ID_BYTES, data_len)
            ident = self.serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
            chain.write(0, ident[:n])
            return VIRTIO_BLK_S_OK, n
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_or_zero(rtype, chain), 0
        return VIRTIO_BLK_S_UNSUPP, 0

    def _discard_or_zero(self, rtype: int, chain: DescriptorChain) -> int:
        feature = VIRTIO_BLK_F_DISCARD if rtype == VIRTIO_BLK_T_DISCARD else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.acked_features & bit(feature):
            return VIRTIO_BLK_S_UNSUPP
        if self.readonly:
            return VIRTIO_BLK_S_IOERR
        payload = chain.read(_HEADER.size)
        if not payload or len(payload) % _SEGMENT.size or len(payload) // _SEGMENT.size > 1:
            return VIRTIO_BLK_S_UNSUPP
        sector, num, flags = _SEGMENT.unpack(payload)
        limit = MAX_DISCARD_SECTORS if rtype == VIRTIO_BLK_T_DISCARD else MAX_WRITE_ZEROES_SECTORS
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (
                rtype == VIRTIO_BLK_T_DISCARD and flags):
            return VIRTIO_BLK_S_UNSUPP
        if num > limit or not self._in_range(sector, num * SECTOR_SIZE):
            return VIRTIO_BLK_S_IOERR
        offset, length = sector * SECTOR_SIZE, num * SECTOR_SIZE
        if length == 0:
            return VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_DISCARD:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as e:  # discard is a hint
                log.debug("%s: discard failed: %s", self.id, e)
            return VIRTIO_BLK_S_OK
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP and self.can_punch:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return VIRTIO_BLK_S_OK
            except OSError:
                continue
        self._write_zeros(offset, length)
        return VIRTIO_BLK_S_OK

    # -- data transfer ------------------------------------------------------------------------
    def direct_views(self, chain: DescriptorChain, segments: List[Segment]) -> Optional[List[memoryview]]:
        """Views of guest memory to do the I/O in place, or None if O_DIRECT forbids it.

        Guest RAM regions are page-aligned host mappings, so a guest-physical address
        has the same alignment on the host.
        """
        a = self.align
        if self.direct and any(addr % a or n % a for addr, n in segments):
            return None
        return [chain.mem.view(addr, n) for addr, n in segments]

    def _read(self, offset: int, chain: DescriptorChain, nbytes: int) -> None:
        if nbytes == 0:
            return
        segments = slice_segments(chain.writable, 0, nbytes)
        views = self.direct_views(chain, segments)
        if views is not None:
            self.preadv_full(views, offset)
            return
        # Through the bounce buffer, at most BOUNCE_CHUNK bytes at a time.
        buf = memoryview(self._bounce_buffer(min(nbytes, BOUNCE_CHUNK)))
        try:
            done = 0
            while done < nbytes:
                n = min(BOUNCE_CHUNK, nbytes - done)
                self.preadv_full([buf[:n]], offset + done)
                pos = 0
                for addr, ln in slice_segments(segments, done, n):
                    chain.mem.write(addr, buf[pos:pos + ln])
                    pos += ln
                done += n
        finally:
            buf.release()

    def _write(self, offset: int, chain: DescriptorChain, nbytes: int) -> None:
        if nbytes == 0:
            return
        segments = slice_segments(chain.readable, _HEADER.size, nbytes)
        views = self.direct_views(chain, segments)
        if views is not None:
            self.pwritev_full(views, offset)
            return
        buf = memoryview(self._bounce_buffer(min(nbytes, BOUNCE_CHUNK)))
        try:
            done = 0
            while done < nbytes:
                n = min(BOUNCE_CHUNK, nbytes - done)
                pos = 0
                for addr, ln in slice_segments(segments, done, n):
                    buf[pos:pos + ln] = chain.mem.view(addr, ln)
                    pos += ln
                self.pwritev_full([buf[:n]], offset + done)
                done += n
        finally:
            buf.release()

    def _write_zeros(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        buf = memoryview(self._bounce_buffer(min(chunk, length)))
        try:
            while length:
                n = min(chunk, length, len(buf))
                buf[:n] = bytes(n)
                self.pwritev_full([buf[:n]], offset)
                offset += n
                length -= n
        finally:
            buf.release()

    def preadv_full(self, views: List[memoryview], offset: int) -> None:
        while views:
            n = os.preadv(self.fd, views[:IOV_MAX], offset)
            if n == 0:  # past the end of the file (a partial last sector): zeros
                for v in views:
                    v[:] = bytes(len(v))
                return
            offset += n
            views = _advance(views, n)

    def pwritev_full(self, views: List[memoryview], offset: int) -> None:
        while views:
            n = os.pwritev(self.fd, views[:IOV_MAX], offset)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            offset += n
            views = _advance(views, n)

    # -- snapshot ---------------------------------------------------------------------------
    def drain(self) -> None:
        """No request is in flight outside the transport lock; make the data durable.

        A throttling retry that fires while the transport is paused is dropped; the
        transport's ``resume()`` processes the queue again.
        """
        self._throttle_pending = False
        self.flush()

    def flush(self) -> None:
        if not self.readonly and self.fd >= 0:
            os.fdatasync(self.fd)

    def save(self) -> BlkState:
        return BlkState(path=self.path, capacity=self.capacity, serial=self.serial,
                        readonly=self.readonly)

    def restore(self, state: BlkState) -> None:
        if state.capacity != self.capacity:
            raise SnapshotError(f"drive {self.path} has {self.capacity} sectors, the snapshot's "
                                f"drive had {state.capacity}")
        if state.serial != self.serial:
            raise SnapshotError(f"drive {self.path}: serial {self.serial!r} differs from the "
                                f"snapshot's {state.serial!r}")
        if state.readonly != self.readonly:
            raise SnapshotError(f"drive {self.path}: readonly={'on' if self.readonly else 'off'} "
                                f"differs from the snapshot")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also drops the OFD lock
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None


def _advance(views: List[memoryview], n: int) -> List[memoryview]:
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out
