"""The bundled test guest: build, image layout (ELF + PVH note, bzImage header), cache."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from stratovirt_py.guest.build import GuestBuildError, build_guest

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")

LOAD_ADDR = 0x100000
ENTRY_64 = LOAD_ADDR + 0x200
# Memory the VMM uses below the kernel (GDT, boot_params, stack, page tables,
# cmdline, MP table): the guest image must stay clear of all of it.
RESERVED_BELOW = 0x100000


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guest-cache")


@pytest.fixture(scope="module")
def elf_path(cache) -> Path:
    return build_guest("elf", cache)


@pytest.fixture(scope="module")
def bz_path(cache) -> Path:
    return build_guest("bzimage", cache)


def _flat_image(path: Path) -> bytes:
    """The PT_LOAD file contents laid out from LOAD_ADDR (what the bzImage carries)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        segs = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        end = max(s["p_paddr"] + s["p_filesz"] for s in segs)
        img = bytearray(end - LOAD_ADDR)
        for s in segs:
            off = s["p_paddr"] - LOAD_ADDR
            img[off : off + s["p_filesz"]] = s.data()
    return bytes(img)


def test_elf_entry_and_segments(elf_path):
    with open(elf_path, "rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64 and elf.little_endian
        assert elf["e_machine"] == "EM_X86_64"
        assert elf["e_type"] == "ET_EXEC"
        assert elf["e_entry"] == ENTRY_64
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads
        for s in loads:
            assert s["p_paddr"] >= RESERVED_BELOW
            assert s["p_memsz"] >= s["p_filesz"]
            assert s["p_paddr"] + s["p_memsz"] < 16 << 20  # fits a small VM
    img = _flat_image(elf_path)
    # startup_64 begins with cli; cld
    assert img[0x200:0x202] == b"\xfa\xfc"


def test_elf_pvh_note(elf_path):
    with open(elf_path, "rb") as f:
        elf = ELFFile(f)
        notes = []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                assert seg["p_align"] == 4  # QEMU aligns the desc by p_align
                notes.extend(seg.iter_notes())
    pvh = [n for n in notes if n["n_name"] == "Xen" and n["n_type"] == 18]
    assert len(pvh) == 1, notes
    desc = pvh[0]["n_desc"]
    desc = desc if isinstance(desc, bytes) else desc.encode("latin-1")
    assert len(desc) == 8
    (entry32,) = struct.unpack("<Q", desc)
    assert entry32 == LOAD_ADDR
    img = _flat_image(elf_path)
    assert img[0:2] == b"\xfa\xfc"  # 32-bit entry: cli; cld


def test_bzimage_header(bz_path, elf_path):
    data = bz_path.read_bytes()
    u8 = lambda off: data[off]
    u16 = lambda off: struct.unpack_from("<H", data, off)[0]
    u32 = lambda off: struct.unpack_from("<I", data, off)[0]
    u64 = lambda off: struct.unpack_from("<Q", data, off)[0]
    setup_sects = u8(0x1F1)
    assert setup_sects >= 1
    assert u16(0x1FE) == 0xAA55
    assert data[0x202:0x206] == b"HdrS"
    assert u16(0x206) >= 0x020C
    assert u8(0x211) & 0x01  # LOADED_HIGH
    assert u32(0x214) == LOAD_ADDR  # code32_start
    assert u16(0x236) & 0x01  # XLF_KERNEL_64
    assert u32(0x238) >= 255  # cmdline_size
    assert u64(0x258) == LOAD_ADDR  # pref_address
    payload_off = (setup_sects + 1) * 512
    payload = data[payload_off:]
    assert u32(0x1F4) * 16 == len(payload)  # syssize (paragraphs)
    flat = _flat_image(elf_path)
    assert payload[: len(flat)] == flat
    assert payload[0x200:0x202] == b"\xfa\xfc"  # 64-bit entry at +0x200
    with open(elf_path, "rb") as f:
        elf = ELFFile(f)
        end = max(s["p_paddr"] + s["p_memsz"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
    assert u32(0x260) >= end - LOAD_ADDR  # init_size covers .bss
    # kernel_version points at a NUL-terminated string inside the setup area
    ver = 0x200 + u16(0x20E)
    assert data[ver : ver + 10] == b"SVGUEST v1"


def test_cache_reuse(tmp_path):
    p1 = build_guest("elf", tmp_path)
    st1 = p1.stat()
    p2 = build_guest("elf", tmp_path)
    assert p1 == p2
    assert p2.stat().st_mtime_ns == st1.st_mtime_ns  # not rebuilt
    b = build_guest("bzimage", tmp_path)
    assert b.parent == p1.parent
    assert p1.parent.name.startswith("guest-")
    assert [d.name for d in tmp_path.iterdir()] == [p1.parent.name]  # no temp dirs left


def test_concurrent_builds(tmp_path):
    results, errors = [], []

    def work():
        try:
            results.append(build_guest("elf", tmp_path))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and results[0].is_file()
    assert [d.name for d in tmp_path.iterdir()] == [results[0].parent.name]


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = build_guest()
    assert p.parent.parent == tmp_path / "stratovirt-py"
    assert p.name == "guest.elf"


def test_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATOVIRT_GUEST_CC", "no-such-gcc-xyz")
    with pytest.raises(GuestBuildError, match="not found"):
        build_guest("elf", tmp_path)


def test_bad_format(tmp_path):
    with pytest.raises(GuestBuildError, match="format"):
        build_guest("pe", tmp_path)


def test_cli_path(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, "-m", "stratovirt_py.guest", "--path", "--format", "bzimage",
         "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.strip()
    assert Path(out).is_file() and out.endswith("guest.bzimage")


def _qemu_usable() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm not usable"
    return None


@pytest.mark.kvm
@pytest.mark.skipif(_qemu_usable() is not None, reason=str(_qemu_usable()))
def test_qemu_pvh_smoke(elf_path, tmp_path):
    """The ELF boots under QEMU microvm (PVH entry): SMP, virtio-blk/rng, heartbeats, power-off."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"SVGUEST-DISK-0123456789".ljust(1 << 20, b"\0"))
    append = "sv.smp sv.blkwrite=3 sv.rng sv.hb=10 sv.hbmax=3"
    cmd = [
        "qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-m", "64",
        "-smp", "2", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-no-reboot", "-global", "virtio-mmio.force-legacy=false",
        "-drive", f"id=d0,file={disk},format=raw,if=none",
        "-device", "virtio-blk-device,drive=d0,serial=SER1",
        "-object", "rng-random,id=r0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=r0",
        "-kernel", str(elf_path), "-append", append,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert lines and lines[0] == "SVGUEST v1 booted", proc.stdout + proc.stderr
    assert lines[1].startswith(f"cmdline: {append} virtio_mmio.device=")
    assert lines[2].startswith("hb-addr: 0x")
    for want in ("smp: 2 cpus in mp table", "cpu 1 online", "smp: 2 cpus online",
                 f"blk: capacity {disk.stat().st_size // 512}", "blk: id SER1",
                 "blk: sector0 " + b"SVGUEST-DISK-012".hex(),
                 "blk: write 3 status 0", "blk: flush status 0", "blk: readback 3 ok"):
        assert want in lines, proc.stdout
    rng = [line for line in lines if line.startswith("rng: ")]
    assert len(rng) == 1 and len(rng[0]) == 5 + 128
    assert [line for line in lines if line.startswith("heartbeat ")] == [
        "heartbeat 1", "heartbeat 2", "heartbeat 3"]
    assert disk.read_bytes()[3 * 512 : 3 * 512 + 20] == b"SVGUEST-WRITE-3SVGUE"
