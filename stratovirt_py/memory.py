"""Guest physical memory: host mappings of guest RAM and bounds-checked access.

Every guest-facing parser (virtqueues, boot structures, snapshot code) goes through
``GuestMemory`` so that an address the guest made up can never reach outside RAM:
out-of-range accesses raise ``GuestMemoryError``, which device code turns into a
device error status instead of letting it escape a vCPU or I/O thread.
"""

from __future__ import annotations

import mmap
import os
import struct

import _cffi_backend

from .record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import List, Sequence, Tuple

from .errors import GuestMemoryError

# cffi's bare FFI (already loaded for the KVM bindings; ctypes would be one more import)
_ffi = _cffi_backend.FFI()

# x86_64 microvm: RAM from 0, with the 32-bit MMIO hole between 3 GiB and 4 GiB.
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000
PAGE_SIZE = 4096


def ram_layout(mem_size: int) -> List[Tuple[int, int]]:
    """Guest-physical (start, size) ranges of RAM for ``mem_size`` bytes."""
    if mem_size <= MMIO_GAP_START:
        return [(0, mem_size)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]


@record
class MemoryRegion:
    gpa: int
    size: int
    mm: mmap.mmap
    # Offset of this region inside a backing file (0 for anonymous memory).
    file_offset: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_addr(self) -> int:
        """Host virtual address of the mapping (for KVM_SET_USER_MEMORY_REGION)."""
        buf = _ffi.from_buffer(self.mm)
        addr = int(_ffi.cast("uintptr_t", buf))
        _ffi.release(buf)
        return addr


def _map(fd: int, size: int, flags: int, offset: int, mem_size: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)
    except OSError as e:
        # ENOMEM here is the host's commit limit: -m asks for more than the host can give.
        raise GuestMemoryError(f"-m {mem_size >> 20}M: cannot map {mem_size >> 20} MiB of guest "
                               f"RAM: {e.strerror}") from None


class GuestMemory:
    """Guest RAM as a list of non-overlapping regions."""

    def __init__(self, regions: Sequence[MemoryRegion]):
        self.regions: List[MemoryRegion] = sorted(regions, key=lambda r: r.gpa)
        self._views = [memoryview(r.mm) for r in self.regions]
        # Plain tuples: every descriptor of every request is located here.
        self._spans = [(i, r.gpa, r.gpa + r.size) for i, r in enumerate(self.regions)]

    # -- construction -------------------------------------------------------
    @classmethod
    def anonymous(cls, mem_size: int) -> "GuestMemory":
        regions = []
        for gpa, size in ram_layout(mem_size):
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            mm = _map(-1, size, flags, 0, mem_size)
            regions.append(MemoryRegion(gpa, size, mm))
        return cls(regions)

    @classmethod
    def from_file(cls, path: str, mem_size: int, mapped: bool = True) -> "GuestMemory":
        """RAM whose initial contents come from ``path`` (laid out region after region).

        ``mapped=True`` maps the file MAP_PRIVATE: pages load on first touch and the
        guest's writes stay private, so the file is never modified and many VMs share
        its page-cache pages.  ``mapped=False`` copies it into anonymous memory.
        """
        if not mapped:
            mem = cls.anonymous(mem_size)
            with open(path, "rb") as f:
                for region in mem.regions:
                    view = memoryview(region.mm)
                    done = 0
                    while done < region.size:
                        n = f.readinto(view[done:])
                        if not n:
                            break
                        done += n
                    view.release()
            return mem
        fd = os.open(path, os.O_RDONLY)
        try:
            regions = []
            offset = 0
            for gpa, size in ram_layout(mem_size):
                mm = _map(fd, size, mmap.MAP_PRIVATE, offset, mem_size)
                regions.append(MemoryRegion(gpa, size, mm, file_offset=offset))
                offset += size
        finally:
            os.close(fd)
        return cls(regions)

    # -- geometry -------------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def _locate(self, gpa: int, length: int) -> Tuple[int, int]:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest address range {gpa:#x}+{length:#x}")
        for i, start, end in self._spans:
            if start <= gpa < end or (length == 0 and gpa == end):
                if gpa + length > end:
                    break
                return i, gpa - start
        raise GuestMemoryError(f"guest address range {gpa:#x}+{length:#x} is not in RAM")

    def check(self, gpa: int, length: int) -> bool:
        """True when ``[gpa, gpa+length)`` lies inside one RAM region."""
        try:
            self._locate(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def host_address(self, gpa: int, length: int) -> int:
        """The host virtual address of ``[gpa, gpa+length)`` (for native code)."""
        i, off = self._locate(gpa, length)
        return self.regions[i].host_addr + off

    # -- access ---------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy writable view of guest RAM (one region only)."""
        i, off = self._locate(gpa, length)
        return self._views[i][off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.view(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.view(gpa, 1)[0] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self.view(gpa, 2), 0, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self.view(gpa, 4), 0, value & 0xFFFF_FFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.view(gpa, 8), 0, value & 0xFFFF_FFFF_FFFF_FFFF)

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._views = []
        for r in self.regions:
            try:
                r.mm.close()
            except BufferError:
                pass
