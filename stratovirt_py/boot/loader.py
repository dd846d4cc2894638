"""Load a Linux kernel (ELF vmlinux or bzImage) and initrd into guest memory."""

from __future__ import annotations

import os
import stat
import struct
from ..record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Optional

from ..errors import BootError, GuestMemoryError
from ..memory import GuestMemory, PAGE_SIZE
from . import layout

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
PT_LOAD = 1
HDRS_MAGIC = b"HdrS"
XLF_KERNEL_64 = 1 << 0
SETUP_HEADER_START = 0x1F1
SETUP_HEADER_END = 0x268


@record
class KernelImage:
    entry: int              # 64-bit entry point (guest-physical)
    end: int                # first byte after the loaded kernel
    setup_header: Optional[bytes] = None   # bzImage header bytes 0x1F1..0x268, to copy into boot_params


# Far above any kernel or initrd a microvm boots, and below what would strain the host:
# the image is read whole into memory before it is copied into the guest.
MAX_IMAGE_BYTES = 1 << 30


def _read(path: str, what: str, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The whole file, refused before reading if it is not a regular file or too big.

    O_NONBLOCK keeps a FIFO from hanging the open (regular files ignore the flag); the
    size is checked again after reading, for a file that grows meanwhile.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BootError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise BootError(f"{what} file {path} is a directory") from None
    except PermissionError:
        raise BootError(f"{what} file {path} is not readable (permission denied)") from None
    except OSError as e:
        raise BootError(f"cannot read {what} file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BootError(f"{what} file {path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise BootError(f"{what} file {path} is not a regular file")
        if st.st_size > limit:
            raise BootError(f"{what} file {path} is too big ({st.st_size} bytes; "
                            f"the limit is {limit} bytes)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BootError(f"cannot read {what} file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BootError(f"{what} file {path} grew past the limit of {limit} bytes while read")
    return data


def load_kernel(mem: GuestMemory, path: str) -> KernelImage:
    data = _read(path, "kernel", min(MAX_IMAGE_BYTES, mem.size))
    if data[:4] == ELF_MAGIC:
        return _load_elf(mem, path, data)
    if len(data) > 0x206 and data[0x202:0x206] == HDRS_MAGIC:
        return _load_bzimage(mem, path, data)
    raise BootError(f"kernel file {path} is neither an ELF vmlinux nor a bzImage")


def _load_elf(mem: GuestMemory, path: str, data: bytes) -> KernelImage:
    if len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise BootError(f"kernel file {path} is not a 64-bit little-endian ELF")
    (e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
     e_phnum) = struct.unpack_from("<HHIQQQIHHH", data, 16)
    if e_machine != EM_X86_64:
        raise BootError(f"kernel file {path} is an ELF for machine {e_machine}, not x86_64")
    if e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(f"kernel file {path} has a truncated program header table")
    end = 0
    loaded = 0
    for i in range(e_phnum):
        p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = \
            struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type != PT_LOAD:
            continue
        if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
            raise BootError(f"kernel file {path} is truncated (segment {i} lies past the end)")
        if not mem.check(p_paddr, p_memsz):
            raise BootError(f"kernel segment {i} at {p_paddr:#x}+{p_memsz:#x} does not fit in guest RAM")
        mem.write(p_paddr, data[p_offset:p_offset + p_filesz])
        if p_memsz > p_filesz:
            mem.view(p_paddr + p_filesz, p_memsz - p_filesz)[:] = bytes(p_memsz - p_filesz)
        end = max(end, p_paddr + p_memsz)
        loaded += 1
    if not loaded:
        raise BootError(f"kernel file {path} has no loadable segments")
    if not mem.check(e_entry, 1):
        raise BootError(f"kernel file {path}: entry point {e_entry:#x} is outside guest RAM")
    return KernelImage(entry=e_entry, end=end)


def _load_bzimage(mem: GuestMemory, path: str, data: bytes) -> KernelImage:
    if len(data) < SETUP_HEADER_END:
        raise BootError(f"kernel file {path} is truncated (in its setup header)")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < 0x202:
        raise BootError(f"kernel file {path} uses boot protocol {version >> 8}.{version & 0xff:02}, "
                        "2.02 or newer is required")
    setup_sects = data[0x1F1] or 4
    xloadflags = struct.unpack_from("<H", data, 0x236)[0] if version >= 0x20C else 0
    if not xloadflags & XLF_KERNEL_64:
        raise BootError(f"kernel file {path} does not support the 64-bit boot entry (XLF_KERNEL_64)")
    code32_start = struct.unpack_from("<I", data, 0x214)[0] or layout.HIGH_MEMORY
    payload = data[(setup_sects + 1) * 512:]
    if not payload:
        raise BootError(f"kernel file {path} is truncated (no protected-mode kernel)")
    init_size = struct.unpack_from("<I", data, 0x260)[0] if version >= 0x20A else 0
    try:
        mem.write(code32_start, payload)
    except GuestMemoryError:
        raise BootError(f"kernel file {path} ({len(payload)} bytes) does not fit in guest RAM") from None
    header = data[SETUP_HEADER_START:SETUP_HEADER_END]
    return KernelImage(entry=code32_start + 0x200,
                       end=code32_start + max(len(payload), init_size),
                       setup_header=header)


def load_initrd(mem: GuestMemory, path: str, kernel_end: int,
                addr_max: int = layout.INITRD_ADDR_MAX) -> "tuple[int, int]":
    """Put the initrd page-aligned at the top of low RAM below ``addr_max``; return (addr, size)."""
    data = _read(path, "initrd", min(MAX_IMAGE_BYTES, mem.size))
    low_end = min(mem.regions[0].end, addr_max)
    addr = (low_end - len(data)) & ~(PAGE_SIZE - 1)
    if addr < kernel_end or not data:
        raise BootError(f"initrd file {path} ({len(data)} bytes) does not fit in guest RAM "
                        "above the kernel" if data else f"initrd file {path} is empty")
    mem.write(addr, data)
    return addr, len(data)
