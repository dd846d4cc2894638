"""Hot-replace of block devices on microvm, as Kata Containers drives it over QMP."""

import re
import time

import pytest

from vmtools import VmProcess, run_cli

pytestmark = pytest.mark.kvm


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "hot.img"
    path.write_bytes(b"HOTPLUGGED-DISK!" + bytes((4 << 20) - 16))
    return path


def blockdev(node, path, ro=False):
    return {"node-name": node, "driver": "raw", "read-only": ro,
            "file": {"driver": "file", "filename": str(path)}, "cache": {"direct": False}}


def last_io(vm):
    return re.findall(r"^io (\d+) blk (ok|fail)$", vm.output, re.M)[-1]


def wait_io(vm, state, after=0, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = re.findall(r"^io (\d+) blk (ok|fail)$", vm.output, re.M)
        if any(int(n) > after and s == state for n, s in lines):
            return max(int(n) for n, s in lines if s == state)
        time.sleep(0.02)
    raise AssertionError(f"no 'io N blk {state}' after {after}:\n{vm.output[-2000:]}")


def test_kata_block_hotplug_conversation(kvm, guest_elf, disk, tmp_path):
    """Kata's exchange: greeting with qemu.major, blockdev-add, device_add into a slot,
    device_del answered by DEVICE_DELETED."""
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hb=50"], tmp_path) as vm:
        q = vm.qmp()
        assert q.greeting["QMP"]["version"]["qemu"]["major"] == 5
        r = q.cmd("blockdev-add", **{"node-name": "drive-abc", "driver": "raw", "read-only": False,
                                     "file": {"driver": "file", "filename": str(disk), "aio": "native"},
                                     "cache": {"direct": False}})
        assert r == {"return": {}}
        r = q.cmd("device_add", id="drive-abc", driver="virtio-blk-mmio", drive="drive-abc", addr="0x1")
        assert r == {"return": {}}
        # The slot is now taken: a second device there is refused.
        q.cmd("blockdev-add", **blockdev("drive-def", disk, ro=True))
        r = q.cmd("device_add", id="drive-def", driver="virtio-blk-mmio", drive="drive-def", addr="0x1")
        assert "occupied" in r["error"]["desc"]
        r = q.cmd("device_add", id="x", driver="virtio-blk-mmio", drive="drive-def", addr="0x9")
        assert "out of range" in r["error"]["desc"]
        assert q.cmd("device_del", id="drive-abc") == {"return": {}}
        ev = q.wait_event("DEVICE_DELETED")
        assert ev["data"]["device"] == "drive-abc"
        r = q.cmd("device_del", id="drive-abc")
        assert "error" in r
        q.cmd("quit")


def test_guest_sees_hotplugged_disk_and_its_removal(kvm, guest_elf, disk, tmp_path):
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.io=blk sv.hb=30"], tmp_path) as vm:
        n = wait_io(vm, "fail")          # the empty slot 0: capacity 0, I/O fails
        q = vm.qmp()
        q.cmd("blockdev-add", **blockdev("d1", disk))
        assert q.cmd("device_add", id="vdisk", driver="virtio-blk-mmio", drive="d1", addr="0x0") == {"return": {}}
        n = wait_io(vm, "ok", after=n)
        sector = 1000 + n % 64
        assert disk.read_bytes()[sector * 512:sector * 512 + 11] == b"SVGUEST-IO-"
        q.cmd("device_del", id="vdisk")
        assert q.wait_event("DEVICE_DELETED")["data"]["device"] == "vdisk"
        wait_io(vm, "fail", after=n)
        q.cmd("quit")


def test_snapshot_after_hotplug_restores_with_named_device(kvm, guest_elf, disk, tmp_path):
    tpl = tmp_path / "tpl"
    base = ["-kernel", str(guest_elf), "-append", "sv.io=blk sv.hb=30"]
    with VmProcess(base, tmp_path) as vm:
        wait_io(vm, "fail")
        q = vm.qmp()
        q.cmd("blockdev-add", **blockdev("d1", disk))
        q.cmd("device_add", id="vdisk", driver="virtio-blk-mmio", drive="d1", addr="0x0")
        wait_io(vm, "ok")
        q.cmd("migrate", uri=f"file:{tpl}")
        while q.cmd("query-migrate")["return"]["status"] in ("setup", "active"):
            time.sleep(0.01)
        at = int(last_io(vm)[0])
        q.cmd("quit")
    # Without the replaced device on the command line: refused, naming it.
    r = run_cli(base + ["-incoming", f"file:{tpl}", "-qmp", f"unix:{tmp_path}/r.sock,server,nowait"])
    assert r.returncode == 1 and "virtio-blk-device 'vdisk'" in r.stderr
    # Naming it (any order, the slot comes from the template): I/O goes on through it.
    with VmProcess(base + ["-drive", f"id=d1,file={disk},direct=off",
                           "-device", "virtio-blk-device,id=vdisk,drive=d1",
                           "-incoming", f"file:{tpl}"], tmp_path) as vm:
        assert wait_io(vm, "ok", after=at) > at
        assert not re.search(r"^io \d+ blk fail$", vm.output, re.M)


def test_backends_are_freed_and_ids_stay_expressible(kvm, guest_elf, disk, tmp_path):
    """blockdev-del / netdev_del free a node-name or netdev id that no device uses (and
    close a netdev's unused descriptors); QMP ids are ones a command line can carry."""
    import array
    import os
    import socket
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hb=50"], tmp_path) as vm:
        q = vm.qmp()
        assert q.cmd("blockdev-add", **blockdev("d1", disk)) == {"return": {}}
        assert q.cmd("device_add", id="vd", driver="virtio-blk-mmio", drive="d1") == {"return": {}}
        assert "in use by device 'vd'" in q.cmd("blockdev-del", **{"node-name": "d1"})["error"]["desc"]
        q.cmd("device_del", id="vd")
        assert q.cmd("blockdev-del", **{"node-name": "d1"}) == {"return": {}}
        assert "not defined" in q.cmd("blockdev-del", **{"node-name": "d1"})["error"]["desc"]
        assert q.cmd("blockdev-add", **blockdev("d1", disk)) == {"return": {}}   # free again
        r, w = os.pipe()
        inode = os.fstat(r).st_ino
        msg = b'{"execute":"getfd","arguments":{"fdname":"p"}}\n'
        q.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        assert q.reply() == {"return": {}}
        os.close(r)
        os.close(w)
        assert q.cmd("netdev_add", id="n0", fds="p") == {"return": {}}
        assert q.cmd("netdev_del", id="n0") == {"return": {}}
        held = [os.readlink(f"/proc/{vm.proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{vm.proc.pid}/fd")]
        assert f"pipe:[{inode}]" not in held
        assert q.cmd("netdev_add", id="n0", ifname="tap9") == {"return": {}}
        for bad in ("", "a\nb", "a\0b", "x" * 300):
            r = q.cmd("device_add", id=bad, driver="virtio-blk-mmio", drive="d1")
            assert "id" in r["error"]["desc"], (bad, r)
            assert "error" in q.cmd("blockdev-add", **blockdev(bad, disk))
            assert "error" in q.cmd("netdev_add", id=bad, ifname="tap9")
        q.cmd("quit")
