"""The zero page (struct boot_params) and the e820 memory map."""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import List, Optional, Tuple

from ..memory import GuestMemory
from . import layout

E820_RAM = 1
E820_RESERVED = 2
BOOT_PARAMS_SIZE = 4096
E820_MAX = 128

# Offsets inside struct boot_params (Documentation/arch/x86/zero-page.rst, boot.rst).
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_SETUP_HEADER = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_HEADER_MAGIC = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_CMDLINE_SIZE = 0x238
OFF_E820_TABLE = 0x2D0

LOADED_HIGH = 0x01
KEEP_SEGMENTS = 0x40


def e820_map(mem: GuestMemory) -> List[Tuple[int, int, int]]:
    entries = [(0, layout.EBDA_START, E820_RAM),
               (layout.EBDA_START, layout.HIGH_MEMORY - layout.EBDA_START, E820_RESERVED)]
    for region in mem.regions:
        start = max(region.gpa, layout.HIGH_MEMORY)
        if region.end > start:
            entries.append((start, region.end - start, E820_RAM))
    return entries


def write_boot_params(mem: GuestMemory, cmdline: bytes, setup_header: Optional[bytes],
                      initrd: Optional[Tuple[int, int]]) -> None:
    bp = bytearray(BOOT_PARAMS_SIZE)
    if setup_header:
        bp[OFF_SETUP_HEADER:OFF_SETUP_HEADER + len(setup_header)] = setup_header
    else:
        struct.pack_into("<H", bp, OFF_BOOT_FLAG, 0xAA55)
        bp[OFF_HEADER_MAGIC:OFF_HEADER_MAGIC + 4] = b"HdrS"
        struct.pack_into("<H", bp, OFF_VERSION, 0x020F)
    bp[OFF_TYPE_OF_LOADER] = 0xFF
    bp[OFF_LOADFLAGS] |= LOADED_HIGH | KEEP_SEGMENTS
    struct.pack_into("<I", bp, OFF_CMD_LINE_PTR, layout.CMDLINE_ADDR & 0xFFFF_FFFF)
    struct.pack_into("<I", bp, OFF_EXT_CMD_LINE_PTR, layout.CMDLINE_ADDR >> 32)
    struct.pack_into("<I", bp, OFF_CMDLINE_SIZE, len(cmdline))
    if initrd:
        addr, size = initrd
        struct.pack_into("<I", bp, OFF_RAMDISK_IMAGE, addr & 0xFFFF_FFFF)
        struct.pack_into("<I", bp, OFF_RAMDISK_SIZE, size & 0xFFFF_FFFF)
        struct.pack_into("<I", bp, OFF_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", bp, OFF_EXT_RAMDISK_SIZE, size >> 32)
    table = e820_map(mem)[:E820_MAX]
    bp[OFF_E820_ENTRIES] = len(table)
    for i, (addr, size, kind) in enumerate(table):
        struct.pack_into("<QQI", bp, OFF_E820_TABLE + i * 20, addr, size, kind)
    mem.write(layout.BOOT_PARAMS_ADDR, bytes(bp))
    mem.write(layout.CMDLINE_ADDR, cmdline + b"\0")
