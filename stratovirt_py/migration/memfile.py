"""The template's ``memory`` file: sparse writing, chunk checksums, verification.

The memory file holds guest RAM regions concatenated in guest-physical order as
``memory.ram_layout(mem_size)`` lists them; the file offset of a region is the sum
of the sizes of the regions before it, so ``GuestMemory.from_file`` can map it
directly.  All-zero 4 KiB pages are never written: they stay holes of a sparse
file (``ftruncate`` gives the file its full size), so disk usage follows what the
guest touched, not its memory size.

Checksums
---------
The file is cut into chunks of ``CHUNK_SIZE`` (2 MiB) bytes by file offset (the
last one may be shorter).  Each chunk gets one table entry ``struct '<II'``:
``(crc, nonzero_pages)``.

* ``nonzero_pages == 0``: the chunk is all zero (a hole); ``crc`` is 0.
* otherwise ``crc = crc32(nonzero pages in ascending order, then the chunk's
  page bitmap)``, where the bitmap has bit ``i % 8`` of byte ``i // 8`` set when
  page ``i`` of the chunk is nonzero (a short last page is one page).

The checksum covers the logical content only, so it does not depend on where
the filesystem keeps holes (a copy that filled the holes verifies the same), and
verification never reads holes (``SEEK_DATA``/``SEEK_HOLE``).  CRC-32 is used
for speed; it detects every error burst up to 32 bits, so a flipped byte is
always found.  It is a corruption check, not an authenticity check.

Zero detection compares 1 MiB blocks against a zero buffer with ``memcmp``
(through ctypes, no copy); only inside nonzero blocks it looks at 64 KiB and then
4 KiB pieces.  Pages that /proc/self/pagemap shows as never touched are not read
at all: they are zero in anonymous memory, and in a private file mapping (a VM
restored from a template) wherever the backing file has a hole.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import zlib
from ..record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Callable, List, Optional, Sequence, Tuple
    ProgressFn = Callable[[str, int, int], None]

from ..errors import SnapshotError
from ..memory import MMIO_GAP_START, PAGE_SIZE, GuestMemory, ram_layout

CHUNK_SIZE = 2 * 1024 * 1024
BLOCK_SIZE = 1024 * 1024  # first zero-check level
SUB_SIZE = 64 * 1024  # second level
READ_SPAN = 16 * 1024 * 1024  # verification reads up to this much at once
ENTRY = struct.Struct("<II")
CHECKSUM_NAME = "crc32-nonzero-pages"

assert MMIO_GAP_START % CHUNK_SIZE == 0  # a chunk never straddles two RAM regions
assert CHUNK_SIZE % BLOCK_SIZE == 0 and BLOCK_SIZE % SUB_SIZE == 0 and SUB_SIZE % PAGE_SIZE == 0

_ZERO = bytes(max(BLOCK_SIZE, READ_SPAN))
_ZERO_VIEW = memoryview(_ZERO)
_native: dict = {}      # ctypes, libc's memcmp and _ZERO's address, set up on first use


def _ctypes():
    """ctypes and libc's memcmp, loaded when memory is first scanned (never on a cached restore)."""
    if not _native:
        import ctypes
        memcmp = ctypes.CDLL(None, use_errno=True).memcmp
        memcmp.restype = ctypes.c_int
        memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        _native.update(ctypes=ctypes, memcmp=memcmp,
                       zero=ctypes.cast(ctypes.c_char_p(_ZERO), ctypes.c_void_p).value)
    return _native
_ZERO_PM = bytes(CHUNK_SIZE // PAGE_SIZE * 8)
_ONES_PM = b"\xff" * len(_ZERO_PM)
MERGE_GAP = 64 * 1024  # holes shorter than this between data are read rather than skipped



class SnapshotCancelled(SnapshotError):
    """Writing a snapshot was cancelled by the caller (its ``cancel`` event)."""


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def _buffer_address(buf) -> Tuple[int, object]:
    """Address of a writable buffer, plus the ctypes object that pins it (del it after use)."""
    ctypes = _ctypes()["ctypes"]
    pin = (ctypes.c_char * 1).from_buffer(buf)
    return ctypes.addressof(pin), pin


def nonzero_pages(addr: int, length: int, mask: Optional[bytes] = None) -> List[int]:
    """Indices of the pages of ``[addr, addr+length)`` that are not all zero.

    ``mask``, when given, has 8 bytes per page; a page whose 8 bytes are all zero
    is known to be zero and is never read.  Writers pass /proc/self/pagemap
    entries of an anonymous mapping (0 = never touched: not present, not
    swapped); verification passes the file's data extents.
    """
    native = _ctypes()
    memcmp, zero = native["memcmp"], native["zero"]
    pages: List[int] = []
    if mask is not None:
        zpm = _ZERO_PM
        if mask == zpm[:len(mask)]:
            return pages        # not one page touched: the common case of an idle guest
        for b in range(0, length, SUB_SIZE):
            bend = min(b + SUB_SIZE, length)
            i0 = b >> 12
            i1 = (bend + PAGE_SIZE - 1) >> 12
            if mask[i0 * 8:i1 * 8] == zpm[:(i1 - i0) * 8]:
                continue
            for i in range(i0, i1):
                if mask[i * 8:i * 8 + 8] != b"\0\0\0\0\0\0\0\0":
                    p = i << 12
                    if memcmp(addr + p, zero, min(PAGE_SIZE, length - p)) != 0:
                        pages.append(i)
        return pages
    for b in range(0, length, BLOCK_SIZE):
        bend = min(b + BLOCK_SIZE, length)
        if memcmp(addr + b, zero, bend - b) == 0:
            continue
        for s in range(b, bend, SUB_SIZE):
            send = min(s + SUB_SIZE, bend)
            if memcmp(addr + s, zero, send - s) == 0:
                continue
            if send - s == SUB_SIZE:
                for p in range(s, send, PAGE_SIZE):
                    if memcmp(addr + p, zero, PAGE_SIZE) != 0:
                        pages.append(p >> 12)
            else:
                for p in range(s, send, PAGE_SIZE):
                    if memcmp(addr + p, zero, min(PAGE_SIZE, send - p)) != 0:
                        pages.append(p >> 12)
    return pages


class _Pagemap:
    """/proc/self/pagemap: which pages of a guest mapping were never touched.

    A page whose pagemap entry is 0 (not present, not swapped) holds what it held
    when it was mapped: zero in private anonymous memory, the backing file's
    content in a private file mapping (a VM restored with ``mapped=True``).
    ``mask_source`` says which, so that such pages are known zero without being
    read (reading them would fault every page of a mostly untouched guest).
    """

    def __init__(self) -> None:
        self.fd: Optional[int] = None
        try:
            self.fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def _vmas(addr: int, length: int) -> Optional[List[Tuple[int, int, str, int, int, str]]]:
        """(lo, hi, perms, offset, inode, name) of the mappings covering the range, or None."""
        end = addr + length
        covered = addr
        out = []
        try:
            with open("/proc/self/maps", "r") as f:
                for line in f:
                    fields = line.split(None, 5)
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    if hi <= addr or lo >= end:
                        continue
                    if lo > covered:
                        return None  # a gap
                    covered = max(covered, hi)
                    name = fields[5].rstrip("\n") if len(fields) > 5 else ""
                    out.append((lo, hi, fields[1], int(fields[2], 16), int(fields[4]), name.strip()))
        except (OSError, ValueError, IndexError):
            return None
        return out if covered >= end else None

    def mask_source(self, addr: int, length: int) -> Optional[Tuple[str, List[Tuple[int, int]]]]:
        """``("anon", [])``, ``("file", data ranges relative to addr)`` or None (read everything)."""
        if self.fd is None:
            return None
        vmas = self._vmas(addr, length)
        if not vmas or any(v[2][3:4] != "p" for v in vmas):
            return None
        if all(v[4] == 0 and (not v[5] or v[5].startswith("[anon")) for v in vmas):
            return ("anon", [])
        if len(vmas) != 1 or vmas[0][4] == 0:
            return None
        lo, hi, _perms, offset, inode, name = vmas[0]
        fd = self._open_backing(lo, hi, name, inode)
        if fd is None:
            return None
        try:
            start = offset + (addr - lo)
            extents = data_extents(fd, start + length, start)
        except OSError:
            return None
        finally:
            os.close(fd)
        return ("file", [(s - start, e - start) for s, e in extents])

    @staticmethod
    def _open_backing(lo: int, hi: int, name: str, inode: int) -> Optional[int]:
        candidates = [f"/proc/self/map_files/{lo:x}-{hi:x}"]
        if name.startswith("/") and not name.endswith(" (deleted)"):
            candidates.insert(0, name)
        for path in candidates:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            if os.fstat(fd).st_ino == inode:
                return fd
            os.close(fd)
        return None

    def entries(self, addr: int, length: int) -> Optional[bytes]:
        if self.fd is None:
            return None
        n = (length + PAGE_SIZE - 1) // PAGE_SIZE * 8
        try:
            data = os.pread(self.fd, n, (addr // PAGE_SIZE) * 8)
        except OSError:
            return None
        return data if len(data) == n else None


def _mark_ranges(mask: Optional[bytearray], ranges: Sequence[Tuple[int, int]], k: int,
                 rel: int, clen: int) -> Tuple[Optional[bytearray], int]:
    """Mark in ``mask`` (8 bytes a page, created when needed) the pages of
    ``[rel, rel+clen)`` that the sorted ``ranges`` touch, starting at index ``k``;
    returns (mask, the index to start from for the next chunk)."""
    while k < len(ranges) and ranges[k][1] <= rel:
        k += 1
    q = k
    while q < len(ranges) and ranges[q][0] < rel + clen:
        if mask is None:
            mask = bytearray(len(_ZERO_PM))
        p0 = (max(ranges[q][0], rel) - rel) >> 12
        p1 = (min(ranges[q][1], rel + clen) - rel + PAGE_SIZE - 1) >> 12
        mask[p0 * 8:p1 * 8] = _ONES_PM[:(p1 - p0) * 8]
        q += 1
    return mask, k


def page_runs(pages: Sequence[int]) -> List[Tuple[int, int]]:
    """Contiguous runs ``[first, end)`` of an ascending list of page indices."""
    runs: List[Tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def chunk_entry(view: memoryview, runs: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """The table entry ``(crc, nonzero_pages)`` of one chunk whose content is ``view``."""
    if not runs:
        return 0, 0
    length = len(view)
    npages = (length + PAGE_SIZE - 1) // PAGE_SIZE
    bitmap = bytearray((npages + 7) // 8)
    crc = 0
    count = 0
    for first, end in runs:
        crc = zlib.crc32(view[first * PAGE_SIZE:min(end * PAGE_SIZE, length)], crc)
        count += end - first
        for p in range(first, end):
            bitmap[p >> 3] |= 1 << (p & 7)
    return zlib.crc32(bitmap, crc), count


# -- writing -----------------------------------------------------------------------

@record
class MemoryWriteStats:
    size: int = 0
    data_bytes: int = 0  # bytes written (nonzero pages)
    data_chunks: int = 0  # chunks with at least one nonzero page
    seconds: float = 0.0


def check_layout(memory: GuestMemory) -> List[Tuple[int, int, int]]:
    """(gpa, size, file_offset) of each region; refuses memory not laid out by ram_layout."""
    size = memory.size
    layout = ram_layout(size)
    got = [(r.gpa, r.size) for r in memory.regions]
    if got != layout:
        raise SnapshotError(
            f"guest memory regions {got} do not follow the standard RAM layout {layout}")
    out = []
    offset = 0
    for gpa, rsize in layout:
        out.append((gpa, rsize, offset))
        offset += rsize
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        data = data[n:]
        offset += n


def write_memory(fd: int, memory: GuestMemory, *,
                 cancel: Optional[threading.Event] = None,
                 progress: Optional[ProgressFn] = None,
                 use_pagemap: bool = True) -> Tuple[bytes, MemoryWriteStats]:
    """Write ``memory`` sparsely into the empty file ``fd``; return (chunk table, stats).

    Untouched pages of anonymous regions are recognised from /proc/self/pagemap
    without reading them (``use_pagemap``).  Raises ``SnapshotCancelled`` when
    ``cancel`` is set (checked before every chunk) and ``OSError`` on write
    errors; the caller removes the file in both cases.
    """
    t0 = time.perf_counter()
    layout = check_layout(memory)
    total = memory.size
    stats = MemoryWriteStats(size=total)
    os.ftruncate(fd, total)
    table = bytearray(chunk_count(total) * ENTRY.size)
    ci = 0
    done = 0
    pagemap = _Pagemap() if use_pagemap else None
    try:
        for region, (_gpa, rsize, foff) in zip(memory.regions, layout):
            view = memoryview(region.mm)
            addr, pin = _buffer_address(region.mm)
            try:
                source = pagemap.mask_source(addr, rsize) if pagemap is not None else None
                k = 0
                for c in range(0, rsize, CHUNK_SIZE):
                    if cancel is not None and cancel.is_set():
                        raise SnapshotCancelled("snapshot cancelled")
                    clen = min(CHUNK_SIZE, rsize - c)
                    mask = None
                    if source is not None:
                        mask = pagemap.entries(addr + c, clen)
                        if mask is not None and source[0] == "file":
                            # not-present pages show the file: they matter where it has data
                            marked, k = _mark_ranges(bytearray(mask), source[1], k, c, clen)
                            mask = bytes(marked)
                    runs = page_runs(nonzero_pages(addr + c, clen, mask))
                    with view[c:c + clen] as cview:
                        for first, end in runs:
                            start = first * PAGE_SIZE
                            stop = min(end * PAGE_SIZE, clen)
                            with cview[start:stop] as part:
                                _pwrite_all(fd, part, foff + c + start)
                            stats.data_bytes += stop - start
                        entry = chunk_entry(cview, runs)
                    if entry[1]:
                        stats.data_chunks += 1
                    ENTRY.pack_into(table, ci * ENTRY.size, *entry)
                    ci += 1
                    done += clen
                    if progress is not None:
                        progress("memory", done, total)
            finally:
                del pin
                view.release()
    finally:
        if pagemap is not None:
            pagemap.close()
    stats.seconds = time.perf_counter() - t0
    return bytes(table), stats


# -- verification ------------------------------------------------------------------

def data_extents(fd: int, size: int, start: int = 0) -> List[Tuple[int, int]]:
    """``[start, end)`` ranges of ``fd`` in ``[start, size)`` that may hold data
    (SEEK_DATA/SEEK_HOLE), clipped to that range.

    Falls back to the whole range where the filesystem cannot report holes.
    """
    extents: List[Tuple[int, int]] = []
    off = start
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after off
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                extents.append((off, size))
                break
            raise
        if data >= size:
            break
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                hole = size
            else:
                raise
        hole = min(hole, size)
        if hole <= data:
            hole = size
        extents.append((data, hole))
        off = hole
    return extents


@record
class MemoryVerifyStats:
    size: int = 0
    bytes_read: int = 0
    reads: int = 0
    data_chunks: int = 0
    seconds: float = 0.0


def _read_exact(fd: int, buf: memoryview, offset: int, path: str) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise SnapshotError(f"memory file {path} is truncated (read at offset {offset:#x} hit the end)")
        buf = buf[n:]
        offset += n


def verify_memory(path: str, size: int, table: bytes, *,
                  progress: Optional[ProgressFn] = None) -> MemoryVerifyStats:
    """Read the data of the memory file ``path`` and check it against the chunk table.

    Holes are not read.  Raises ``SnapshotError`` naming the first bad chunk.
    """
    t0 = time.perf_counter()
    nchunks = chunk_count(size)
    if len(table) != nchunks * ENTRY.size:
        raise SnapshotError(f"the state's memory checksum table has {len(table) // ENTRY.size} "
                            f"entries, expected {nchunks}")
    stats = MemoryVerifyStats(size=size)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SnapshotError(f"template memory file {path} is missing") from None
    except OSError as e:
        raise SnapshotError(f"cannot open template memory file {path}: {e.strerror}") from None
    buf = bytearray(READ_SPAN)
    mv = memoryview(buf)
    addr, pin = _buffer_address(buf)
    try:
        st = os.fstat(fd)
        if st.st_size < size:
            raise SnapshotError(f"memory file {path} is truncated: {st.st_size} bytes, "
                                f"the state describes {size}")
        if st.st_size != size:
            raise SnapshotError(f"memory file {path} has {st.st_size} bytes, "
                                f"but the state describes {size}")
        extents = data_extents(fd, size)
        ei = 0
        for span in range(0, size, READ_SPAN):
            span_end = min(span + READ_SPAN, size)
            while ei < len(extents) and extents[ei][1] <= span:
                ei += 1
            # data extents of this span, relative to the span
            parts = []
            j = ei
            while j < len(extents) and extents[j][0] < span_end:
                parts.append((max(extents[j][0], span) - span, min(extents[j][1], span_end) - span))
                j += 1
            # read them, merging short holes into larger reads (holes read as zeros)
            reads: List[Tuple[int, int]] = []
            for s, e in parts:
                if reads and s - reads[-1][1] < MERGE_GAP:
                    reads[-1] = (reads[-1][0], e)
                else:
                    reads.append((s, e))
            for s, e in reads:
                _read_exact(fd, mv[s:e], span + s, path)
                stats.reads += 1
                stats.bytes_read += e - s
            # Pages outside the extents are zero and never looked at (the buffer
            # there holds stale data): the mask tells nonzero_pages so.
            k = 0
            for c in range(span, span_end, CHUNK_SIZE):
                ci = c // CHUNK_SIZE
                clen = min(CHUNK_SIZE, size - c)
                rel = c - span
                mask, k = _mark_ranges(None, parts, k, rel, clen)
                if mask is not None:
                    runs = page_runs(nonzero_pages(addr + rel, clen, bytes(mask)))
                    got = chunk_entry(mv[rel:rel + clen], runs)
                else:
                    got = (0, 0)
                want = ENTRY.unpack_from(table, ci * ENTRY.size)
                if got != want:
                    raise SnapshotError(
                        f"memory file {path} is corrupt: chunk {ci} (offset {c:#x}, {clen} bytes) "
                        f"does not match its checksum")
                if want[1]:
                    stats.data_chunks += 1
            if progress is not None:
                progress("verify", span_end, size)
    finally:
        del pin
        mv.release()
        os.close(fd)
    stats.seconds = time.perf_counter() - t0
    return stats
