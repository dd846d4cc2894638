"""Build the bundled test guest with the machine's gcc/ld.

``build_guest(fmt)`` compiles ``src/`` into a cache directory keyed by a hash of
the sources and the flags, and returns the path of the requested image:

* ``"elf"``: a 64-bit ELF linked at 1 MiB (``e_entry`` = the 64-bit Linux-style
  entry at 0x100200), with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) for QEMU;
* ``"bzimage"``: Linux bzImage layout: setup sectors carrying the boot-protocol
  header, then the protected-mode payload (flat image of the ELF from 1 MiB)
  whose 64-bit entry point is at payload offset 0x200.

Builds are atomic (temporary directory + rename), so concurrent test processes
may call this at the same time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from stratovirt_py.errors import VmmError

SRC_DIR = Path(__file__).resolve().parent / "src"

#: Bumped when the build procedure itself changes in a way the hash cannot see.
BUILD_VERSION = 1

LOAD_ADDR = 0x100000
SETUP_SECTS = 4
PROTOCOL_VERSION = 0x020C
LOADFLAGS_LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
CMDLINE_SIZE = 4095

CFLAGS = [
    "-std=gnu11",
    "-O2",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-no-pie",
    "-static",
    "-march=x86-64",
    "-mtune=generic",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mno-popcnt",
    "-mcmodel=small",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-fno-common",
    "-fno-strict-aliasing",
    "-Wall",
    "-Wno-unused-function",
]
LDFLAGS = [
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=4096",
    "-Wl,-z,noexecstack",
]

FORMATS = {"elf": "guest.elf", "bzimage": "guest.bzimage"}


class GuestBuildError(VmmError):
    """The test guest cannot be built (no compiler, compile error, ...)."""


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stratovirt-py"


def _sources() -> list[Path]:
    files = [
        p
        for p in sorted(SRC_DIR.iterdir())
        if p.suffix in (".c", ".S", ".h", ".ld") and p.is_file()
    ]
    if not files:
        raise GuestBuildError(f"guest sources not found in {SRC_DIR}")
    return files


def source_hash(extra: str = "") -> str:
    """Hash of the sources, flags and build procedure version."""
    h = hashlib.sha256()
    h.update(f"v{BUILD_VERSION}\0".encode())
    h.update(("\0".join(CFLAGS + LDFLAGS)).encode())
    h.update(extra.encode())
    for p in _sources():
        h.update(b"\0" + p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _compiler() -> str:
    cc = os.environ.get("STRATOVIRT_GUEST_CC", "gcc")
    if shutil.which(cc) is None:
        raise GuestBuildError(
            f"cannot build the test guest: the C compiler {cc!r} was not found "
            "(install gcc and binutils)"
        )
    return cc


def _load_segments(elf: bytes) -> tuple[int, list[tuple[int, bytes, int]]]:
    """(e_entry, [(p_paddr, file bytes, p_memsz)]) of an ELF64 little-endian image."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestBuildError("the linked guest is not an ELF64 little-endian file")
    e_entry, e_phoff = struct.unpack_from("<QQ", elf, 0x18)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    segs = []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", elf, off
        )
        if p_type == 1:  # PT_LOAD
            segs.append((p_paddr, elf[p_offset : p_offset + p_filesz], p_memsz))
    return e_entry, segs


def make_bzimage(elf: bytes, setup_blob: bytes) -> bytes:
    """Build a bzImage-shaped file from the linked ELF and the assembled setup area."""
    entry, segs = _load_segments(elf)
    if entry != LOAD_ADDR + 0x200:
        raise GuestBuildError(f"guest entry is {entry:#x}, expected {LOAD_ADDR + 0x200:#x}")
    end_file = max(p + len(data) for p, data, _ in segs)
    end_mem = max(p + memsz for p, _, memsz in segs)
    payload = bytearray(end_file - LOAD_ADDR)
    for paddr, data, _ in segs:
        if paddr < LOAD_ADDR:
            raise GuestBuildError(f"guest segment below 1 MiB at {paddr:#x}")
        payload[paddr - LOAD_ADDR : paddr - LOAD_ADDR + len(data)] = data
    payload += bytes(-len(payload) % 16)
    init_size = (end_mem - LOAD_ADDR + 0xFFF) & ~0xFFF

    setup = bytearray(setup_blob)
    if len(setup) != (SETUP_SECTS + 1) * 512:
        raise GuestBuildError(f"setup area is {len(setup)} bytes, expected {(SETUP_SECTS + 1) * 512}")
    if setup[0x200] != 0xEB:
        raise GuestBuildError("setup area lacks the short jump at 0x200")
    version_off = setup.find(b"SVGUEST v1")
    struct.pack_into("<B", setup, 0x1F1, SETUP_SECTS)  # setup_sects
    struct.pack_into("<H", setup, 0x1F2, 0)  # root_flags
    struct.pack_into("<I", setup, 0x1F4, len(payload) // 16)  # syssize
    struct.pack_into("<H", setup, 0x1F8, 0)  # ram_size
    struct.pack_into("<H", setup, 0x1FA, 0xFFFF)  # vid_mode: normal
    struct.pack_into("<H", setup, 0x1FC, 0)  # root_dev
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)  # boot_flag
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, PROTOCOL_VERSION)
    struct.pack_into("<I", setup, 0x208, 0)  # realmode_swtch
    struct.pack_into("<H", setup, 0x20C, 0x1000)  # start_sys_seg
    struct.pack_into("<H", setup, 0x20E, max(version_off - 0x200, 0))  # kernel_version
    struct.pack_into("<B", setup, 0x210, 0)  # type_of_loader
    struct.pack_into("<B", setup, 0x211, LOADFLAGS_LOADED_HIGH)  # loadflags
    struct.pack_into("<H", setup, 0x212, 0x8000)  # setup_move_size
    struct.pack_into("<I", setup, 0x214, LOAD_ADDR)  # code32_start
    struct.pack_into("<I", setup, 0x218, 0)  # ramdisk_image
    struct.pack_into("<I", setup, 0x21C, 0)  # ramdisk_size
    struct.pack_into("<I", setup, 0x220, 0)  # bootsect_kludge
    struct.pack_into("<H", setup, 0x224, 0)  # heap_end_ptr
    struct.pack_into("<I", setup, 0x228, 0)  # cmd_line_ptr
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment
    struct.pack_into("<B", setup, 0x234, 0)  # relocatable_kernel: no
    struct.pack_into("<B", setup, 0x235, 12)  # min_alignment (log2)
    struct.pack_into("<H", setup, 0x236, XLF_KERNEL_64)  # xloadflags
    struct.pack_into("<I", setup, 0x238, CMDLINE_SIZE)  # cmdline_size
    struct.pack_into("<I", setup, 0x23C, 0)  # hardware_subarch
    struct.pack_into("<Q", setup, 0x240, 0)  # hardware_subarch_data
    struct.pack_into("<I", setup, 0x248, 0)  # payload_offset
    struct.pack_into("<I", setup, 0x24C, 0)  # payload_length
    struct.pack_into("<Q", setup, 0x250, 0)  # setup_data
    struct.pack_into("<Q", setup, 0x258, LOAD_ADDR)  # pref_address
    struct.pack_into("<I", setup, 0x260, init_size)  # init_size
    struct.pack_into("<I", setup, 0x264, 0)  # handover_offset
    return bytes(setup) + bytes(payload)


def _run_all(cmds: list[list[str]], cwd: Path) -> None:
    """Run independent compiler commands in parallel; raise on the first failure."""
    procs = []
    try:
        for cmd in cmds:
            try:
                procs.append((cmd, subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, text=True)))
            except FileNotFoundError as err:
                raise GuestBuildError(
                    f"cannot build the test guest: {cmd[0]!r} not found (install gcc and binutils)"
                ) from err
        for cmd, proc in procs:
            _out, err = proc.communicate()
            if proc.returncode != 0:
                raise GuestBuildError(
                    f"cannot build the test guest: {' '.join(cmd)} failed with exit status "
                    f"{proc.returncode}:\n{err.strip()}"
                )
    finally:
        for _cmd, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _compile(out: Path) -> None:
    cc = _compiler()
    objs, cmds = [], []
    for src in _sources():
        if src.suffix not in (".c", ".S") or src.name == "setup.S":
            continue
        obj = out / (src.stem + ("_S" if src.suffix == ".S" else "") + ".o")
        cmds.append([cc, *CFLAGS, "-I", str(SRC_DIR), "-c", str(src), "-o", str(obj)])
        objs.append(str(obj))
    setup_obj = out / "setup.o"
    setup_bin = out / "setup.bin"
    cmds.append([cc, *CFLAGS, "-c", str(SRC_DIR / "setup.S"), "-o", str(setup_obj)])
    _run_all(cmds, out)

    elf = out / "guest.elf"
    _run_all(
        [
            [cc, *LDFLAGS, "-T", str(SRC_DIR / "guest.ld"), "-o", str(elf), *objs],
            [cc, *LDFLAGS, "-Wl,-Ttext=0", "-Wl,--oformat=binary", "-Wl,-e,0",
             "-o", str(setup_bin), str(setup_obj)],
        ],
        out,
    )
    (out / "guest.bzimage").write_bytes(make_bzimage(elf.read_bytes(), setup_bin.read_bytes()))
    for o in out.glob("*.o"):
        o.unlink()
    setup_bin.unlink()


def build_guest(fmt: str = "elf", cache_dir: Optional[Path] = None) -> Path:
    """Build the guest if needed; return the path of the image in format ``fmt``.

    ``cache_dir`` is the cache root (default ``${XDG_CACHE_HOME:-~/.cache}/stratovirt-py``);
    the images go to ``<cache_dir>/guest-<hash>/``.
    """
    if fmt not in FORMATS:
        raise GuestBuildError(f"unknown guest image format {fmt!r} (use 'elf' or 'bzimage')")
    root = Path(cache_dir) if cache_dir is not None else _default_cache_root()
    final = root / f"guest-{source_hash()}"
    target = final / FORMATS[fmt]
    if target.is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    except OSError as err:
        raise GuestBuildError(f"cannot create the guest cache directory {root}: {err}") from err
    try:
        _compile(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race (the directory exists and is complete).
            if not target.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not target.is_file():
        raise GuestBuildError(f"guest build did not produce {target}")
    return target
