"""virtio-blk, virtio-rng and virtio-console driven by the test guest's own driver."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from vmtools import VmProcess, run_cli

pytestmark = pytest.mark.kvm

PATTERN = b"HOSTPATTERN-0123"


@pytest.fixture
def disk(tmp_path):
    """An 8 MiB raw image whose sector 0 starts with a pattern the host wrote."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(PATTERN + bytes(512 - len(PATTERN)))
        f.truncate(8 << 20)
    return path


def blk_args(guest, disk, append, drive_opts="", dev_opts=""):
    return ["-kernel", str(guest), "-append", f"console=ttyS0 {append}",
            "-drive", f"id=d0,file={disk}{drive_opts}",
            "-device", f"virtio-blk-device,drive=d0,id=blk0{dev_opts}"]


def test_blk_read_write_flush_and_get_id(kvm, guest_elf, disk, tmp_path):
    with VmProcess(blk_args(guest_elf, disk, "sv.blkwrite=5 sv.hbmax=1", dev_opts=",serial=SER-123"),
                   tmp_path) as vm:
        assert vm.wait() == 0
        out = vm.output
    assert "blk: capacity 16384\n" in out
    assert "blk: id SER-123\n" in out
    assert f"blk: sector0 {PATTERN.hex()}\n" in out      # the guest read what the host wrote
    assert "blk: write 5 status 0\n" in out
    assert "blk: flush status 0\n" in out
    assert "blk: readback 5 ok\n" in out
    data = disk.read_bytes()
    expected = (b"SVGUEST-WRITE-5" * 40)[:512]
    assert data[5 * 512:6 * 512] == expected            # ... and the host finds what it wrote
    assert data[:16] == PATTERN


def test_blk_direct_io(kvm, guest_elf, tmp_path):
    """direct=on (the default) opens with O_DIRECT; the image must sit on a real filesystem."""
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout
    base = tmp_path if "tmpfs" not in fs else Path("/var/tmp")
    disk = base / f"direct-{os.getpid()}.img"
    disk.write_bytes(PATTERN + bytes((1 << 20) - len(PATTERN)))
    try:
        with VmProcess(blk_args(guest_elf, disk, "sv.blkwrite=9 sv.hbmax=1", drive_opts=",direct=on"),
                       tmp_path) as vm:
            assert vm.wait() == 0
        assert f"blk: sector0 {PATTERN.hex()}" in vm.output
        assert "blk: readback 9 ok" in vm.output
        assert disk.read_bytes()[9 * 512:9 * 512 + 15] == b"SVGUEST-WRITE-9"
    finally:
        disk.unlink()


def test_blk_readonly_refuses_writes(kvm, guest_elf, disk, tmp_path):
    before = disk.read_bytes()
    with VmProcess(blk_args(guest_elf, disk, "sv.blkwrite=5 sv.hbmax=1", drive_opts=",readonly=on"),
                   tmp_path) as vm:
        assert vm.wait() == 0
    assert "blk: write 5 status 1\n" in vm.output          # VIRTIO_BLK_S_IOERR
    assert "blk: readback 5 mismatch\n" in vm.output
    assert disk.read_bytes() == before


def test_second_vmm_on_same_drive_is_refused(kvm, guest_elf, disk, tmp_path):
    with VmProcess(blk_args(guest_elf, disk, "sv.blk"), tmp_path) as vm:
        vm.wait_for(r"^blk: capacity")
        r = run_cli(blk_args(guest_elf, disk, "sv.blk") + ["-qmp", f"unix:{tmp_path}/2.sock,server,nowait"])
        assert r.returncode == 1
        assert "locked" in r.stderr and str(disk) in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        vm.qmp().cmd("quit")
        assert vm.wait() == 0


def test_missing_drive_file(kvm, guest_elf, tmp_path):
    r = run_cli(blk_args(guest_elf, tmp_path / "nope.img", "sv.blk") +
                ["-qmp", f"unix:{tmp_path}/s,server,nowait"])
    assert r.returncode == 1 and "nope.img" in r.stderr and "Traceback" not in r.stderr


def test_rng(kvm, guest_elf, tmp_path):
    outs = []
    for i in range(2):
        with VmProcess(["-kernel", str(guest_elf), "-append", "sv.rng sv.hbmax=1",
                        "-object", "rng-random,id=r0,filename=/dev/urandom",
                        "-device", "virtio-rng-device,rng=r0,id=rng0"], tmp_path) as vm:
            assert vm.wait() == 0
        outs.append(re.search(r"^rng: ([0-9a-f]{128})$", vm.output, re.M).group(1))
    assert outs[0] != outs[1] and outs[0] != "0" * 128


@pytest.mark.parametrize("backend", ["file", "socket"])
def test_console_reaches_chardev(kvm, guest_elf, tmp_path, backend):
    import socket as sk
    import time
    path = tmp_path / ("console.txt" if backend == "file" else "console.sock")
    chardev = f"file,id=c0,path={path}" if backend == "file" else f"socket,id=c0,path={path},server,nowait"
    args = ["-kernel", str(guest_elf), "-append", "sv.console sv.hb=50 sv.hbmax=40" if backend == "socket"
            else "sv.console sv.hbmax=1",
            "-device", "virtio-serial-device,id=vs0", "-chardev", chardev,
            "-device", "virtconsole,chardev=c0,id=con0"]
    if backend == "file":
        with VmProcess(args, tmp_path) as vm:
            assert vm.wait() == 0
        assert "console: sent" in vm.output
        assert path.read_text() == "hello from virtio-console\n"
        return
    # A socket chardev: connect before the guest writes (-S holds it), then let it run.
    with VmProcess(["-S"] + args, tmp_path) as vm:
        q = vm.qmp()
        deadline = time.time() + 10
        while not path.exists() and time.time() < deadline:
            time.sleep(0.02)
        c = sk.socket(sk.AF_UNIX)
        c.connect(str(path))
        q.cmd("cont")
        c.settimeout(20)
        got = b""
        while b"\n" not in got:
            got += c.recv(100)
        assert got == b"hello from virtio-console\n"
        q.cmd("quit")


def test_malformed_descriptors_need_reset_vmm_survives(kvm, guest_elf, disk, tmp_path):
    with VmProcess(blk_args(guest_elf, disk, "sv.bad=blk sv.hb=20 sv.hbmax=5"), tmp_path) as vm:
        vm.wait_for(r"^bad: status 0x[0-9a-f]+$")
        status = int(re.search(r"^bad: status (0x[0-9a-f]+)$", vm.output, re.M).group(1), 16)
        assert status & 0x40, f"NEEDS_RESET not set: {status:#x}"
        vm.wait_for(r"^heartbeat 5$")       # the guest and the VMM carried on
        assert vm.wait() == 0
    assert "needs reset" in vm.stderr and "Traceback" not in vm.stderr


def test_malformed_descriptors_leave_other_devices_working(kvm, guest_elf, disk, tmp_path):
    with VmProcess(blk_args(guest_elf, disk, "sv.bad=blk sv.io=rng sv.hb=20 sv.hbmax=3") +
                   ["-object", "rng-random,id=r0,filename=/dev/urandom",
                    "-device", "virtio-rng-device,rng=r0,id=rng0"], tmp_path) as vm:
        assert vm.wait() == 0
    assert re.search(r"^bad: status 0x4f$", vm.output, re.M)
    assert "io 3 rng ok" in vm.output


def devices_args(guest, disk, console_path, append):
    return blk_args(guest, disk, append, dev_opts=",serial=SNAP-1") + [
        "-object", "rng-random,id=r0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=r0,id=rng0",
        "-device", "virtio-serial-device,id=vs0",
        "-chardev", f"file,id=c0,path={console_path}",
        "-device", "virtconsole,chardev=c0,id=con0"]


def test_snapshot_restore_keeps_devices_working(kvm, guest_elf, disk, tmp_path):
    """Disk written before the snapshot is there after restore, and blk, rng and
    console I/O go on through the restored queues."""
    tpl = tmp_path / "tpl"
    con1 = tmp_path / "console1.txt"
    append = "sv.blkwrite=7 sv.io=blk,rng,con sv.hb=20"
    with VmProcess(devices_args(guest_elf, disk, con1, append), tmp_path) as vm:
        vm.wait_for(r"^io 3 blk ok rng ok con ok$")
        q = vm.qmp()
        q.cmd("stop")
        q.cmd("migrate", uri=f"file:{tpl}")
        while q.cmd("query-migrate")["return"]["status"] in ("setup", "active"):
            pass
        assert q.cmd("query-migrate")["return"]["status"] == "completed"
        at = int(re.findall(r"^heartbeat (\d+)$", vm.output, re.M)[-1])
        q.cmd("quit")
        vm.wait()
    assert disk.read_bytes()[7 * 512:7 * 512 + 15] == b"SVGUEST-WRITE-7"

    con2 = tmp_path / "console2.txt"
    with VmProcess(devices_args(guest_elf, disk, con2, append) + ["-incoming", f"file:{tpl}"],
                   tmp_path) as vm:
        vm.wait_for(rf"^io {at + 3} blk ok rng ok con ok$")
        assert "SVGUEST v1 booted" not in vm.output
        assert re.search(rf"^io {at + 1} blk ok rng ok con ok$", vm.output, re.M)
        n = at + 3
        sector = 1000 + n % 64
        assert disk.read_bytes()[sector * 512:sector * 512 + 11 + len(str(n))] == f"SVGUEST-IO-{n}".encode()
        vm.qmp().cmd("quit")
    assert f"io {at + 1}\n" in con2.read_text()


def test_restore_with_other_serial_refused(kvm, guest_elf, disk, tmp_path):
    tpl = tmp_path / "tpl"
    args = blk_args(guest_elf, disk, "sv.hb=20", dev_opts=",serial=A")
    with VmProcess(args, tmp_path) as vm:
        vm.wait_for(r"^heartbeat 1$")
        q = vm.qmp()
        q.cmd("migrate", uri=f"file:{tpl}")
        while q.cmd("query-migrate")["return"]["status"] in ("setup", "active"):
            pass
        q.cmd("quit")
    r = run_cli(blk_args(guest_elf, disk, "sv.hb=20", dev_opts=",serial=B") +
                ["-incoming", f"file:{tpl}", "-qmp", f"unix:{tmp_path}/r.sock,server,nowait"])
    assert r.returncode == 1
    assert "serial is 'B' but the template has 'A'" in r.stderr
    # A copy of the drive at another path is fine.
    copy = tmp_path / "copy.img"
    copy.write_bytes(disk.read_bytes())
    with VmProcess(blk_args(guest_elf, copy, "sv.hb=20", dev_opts=",serial=A") +
                   ["-incoming", f"file:{tpl}"], tmp_path) as vm:
        vm.wait_for(r"^heartbeat \d+$")
    # Another device set is refused, naming the device.
    r = run_cli(["-kernel", str(guest_elf), "-append", "sv.hb=20", "-incoming", f"file:{tpl}",
                 "-qmp", f"unix:{tmp_path}/r2.sock,server,nowait"])
    assert r.returncode == 1 and "virtio-blk-device 'blk0'" in r.stderr


def test_devices_go_on_after_snapshot_and_cont(kvm, guest_elf, disk, tmp_path):
    args = devices_args(guest_elf, disk, tmp_path / "c.txt", "sv.io=blk,rng,con sv.hb=20")
    with VmProcess(args, tmp_path) as vm:
        vm.wait_for(r"^io 2 blk ok rng ok con ok$")
        q = vm.qmp()
        q.cmd("migrate", uri=f"file:{tmp_path}/tpl")
        while q.cmd("query-migrate")["return"]["status"] in ("setup", "active"):
            pass
        at = int(re.findall(r"^heartbeat (\d+)$", vm.output, re.M)[-1])
        q.cmd("cont")
        vm.wait_for(rf"^io {at + 2} blk ok rng ok con ok$")
        q.cmd("quit")


@pytest.mark.parametrize("bench", ["read,65536,2048", "write,4096,4096",
                                   "read,4096,4096,48,rand", "write,1048576,64"])
def test_blk_many_requests_all_complete(kvm, guest_elf, tmp_path, bench):
    """Thousands of requests, 16 in flight (48 through indirect tables, at random offsets;
    2 of 1 MiB): every completion the guest sees is real (this caught used-ring updates
    the guest did not see on kvm_pvm hosts)."""
    disk = tmp_path / "bench.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    for _ in range(2):
        with VmProcess(["-m", "128", "-kernel", str(guest_elf), "-append", f"sv.blkbench={bench} sv.hbmax=1",
                        "-drive", f"id=d0,file={disk},direct=off",
                        "-device", "virtio-blk-device,drive=d0,id=b0"], tmp_path) as vm:
            assert vm.wait(60) == 0
        rw, bs, count = bench.split(",")[:3]
        assert re.search(rf"^blkbench: {rw} {bs} {count} \d+ \d+$", vm.output, re.M), vm.output[-500:]
        assert "blkbench: errors" not in vm.output
        assert "needs reset" not in vm.stderr
