"""Booting guests on /dev/kvm through the Linux 64-bit boot protocol, and the VM's life."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vmtools import QmpClient, VmProcess, run_cli, stratovirt_cmd

pytestmark = pytest.mark.kvm


def test_elf_boot_delivers_command_line(kvm, guest_elf, tmp_path):
    with VmProcess(["-machine", "microvm", "-kernel", str(guest_elf),
                    "-append", "console=ttyS0 x=1", "-append", "sv.hbmax=2"], tmp_path) as vm:
        vm.wait_for(r"^SVGUEST v1 booted$")
        # Repeated -append options are joined with a space; the VMM then announces the
        # (replaceable) virtio-mmio slots the way Linux parses them.
        m = vm.wait_for(r"^cmdline: console=ttyS0 x=1 sv.hbmax=2( virtio_mmio.device=512@0x[0-9a-f]+:\d+)*$")
        assert "virtio_mmio.device=512@0xf0100000:5" in m.group(0)
        vm.wait_for(r"^heartbeat 2$")
        assert vm.wait() == 0       # the guest powers off after its second heartbeat
    assert vm.output.count("SVGUEST v1 booted") == 1


def test_bzimage_boot(kvm, guest_bzimage, tmp_path):
    with VmProcess(["-kernel", str(guest_bzimage), "-append", "console=ttyS0 bz=yes sv.hbmax=1"],
                   tmp_path) as vm:
        vm.wait_for(r"^cmdline: console=ttyS0 bz=yes sv.hbmax=1 virtio_mmio")
        vm.wait_for(r"^heartbeat 1$")
        assert vm.wait() == 0


def test_external_guest(kvm, tmp_path):
    """A 64-bit ELF written elsewhere, using only COM1 and boot_params.cmd_line_ptr."""
    src = Path(__file__).parent / "data" / "external_guest.S"
    elf = tmp_path / "external.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x100000",
                    "-Wl,--build-id=none", "-o", str(elf), str(src)], check=True)
    r = subprocess.run(stratovirt_cmd() + [
        "-machine", "microvm", "-kernel", str(elf), "-append", "console=ttyS0 x=1",
        "-qmp", f"unix:{tmp_path}/s,server,nowait", "-serial", "stdio"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    first, cmdline = r.stdout.splitlines()
    assert first == "hello from mini"
    assert cmdline.startswith("console=ttyS0 x=1 virtio_mmio.device=512@0xf0100000:5")


def test_smp_two_cpus(kvm, guest_elf, tmp_path):
    with VmProcess(["-smp", "2", "-kernel", str(guest_elf), "-append", "sv.smp sv.hbmax=1"],
                   tmp_path) as vm:
        vm.wait_for(r"^smp: 2 cpus in mp table$", timeout=60)
        vm.wait_for(r"^cpu 1 online$", timeout=60)
        vm.wait_for(r"^smp: 2 cpus online$", timeout=60)
        assert vm.wait(60) == 0


def test_smp_four_cpus_query_cpus(kvm, guest_elf, tmp_path):
    with VmProcess(["-smp", "cpus=4", "-kernel", str(guest_elf), "-append", "sv.smp"], tmp_path) as vm:
        vm.wait_for(r"^smp: 4 cpus online$", timeout=90)
        for apic in (1, 2, 3):
            assert f"cpu {apic} online" in vm.output
        q = vm.qmp()
        cpus = q.cmd("query-cpus")["return"]
        assert [c["CPU"] for c in cpus] == [0, 1, 2, 3]
        assert len({c["thread_id"] for c in cpus}) == 4
        q.cmd("quit")
        assert vm.wait() == 0


@pytest.mark.parametrize("mode", ["sv.reset", "sv.triplefault", "sv.poweroff"])
def test_guest_reset_and_poweroff_end_the_process(kvm, guest_elf, tmp_path, mode):
    with VmProcess(["-kernel", str(guest_elf), "-append", mode], tmp_path) as vm:
        vm.wait_for(r"^SVGUEST v1 booted$")
        assert vm.wait() == 0
        assert "Traceback" not in vm.stderr


def test_guest_poweroff_emits_shutdown_event(kvm, guest_elf, tmp_path):
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hb=200 sv.hbmax=3"], tmp_path) as vm:
        q = vm.qmp()
        ev = q.wait_event("SHUTDOWN", timeout=30)
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert vm.wait() == 0


def test_qmp_quit(kvm, guest_elf, tmp_path):
    with VmProcess(["-kernel", str(guest_elf)], tmp_path) as vm:
        vm.wait_for(r"^heartbeat 1$")
        q = vm.qmp()
        assert q.greeting["QMP"]["version"]["qemu"]["major"] == 5
        assert q.cmd("quit") == {"return": {}}
        ev = q.wait_event("SHUTDOWN")
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert vm.wait() == 0
    assert not os.path.exists(vm.qmp_path), "the QMP socket file is removed at exit"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(kvm, guest_elf, tmp_path, sig):
    with VmProcess(["-kernel", str(guest_elf)], tmp_path) as vm:
        vm.wait_for(r"^heartbeat 1$")
        vm.proc.send_signal(sig)
        assert vm.wait() == 0
        assert "Traceback" not in vm.stderr
    assert not os.path.exists(vm.qmp_path)


def test_stop_stops_the_guest_and_cont_resumes(kvm, guest_elf, tmp_path):
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hb=20"], tmp_path) as vm:
        vm.wait_for(r"^heartbeat 3$")
        q = vm.qmp()
        assert q.cmd("stop") == {"return": {}}
        assert q.events and q.events[0]["event"] == "STOP", "STOP comes before the reply"
        beats = re.findall(r"heartbeat (\d+)", vm.output)
        time.sleep(0.5)
        assert re.findall(r"heartbeat (\d+)", vm.output) == beats, "heartbeats went on while paused"
        assert q.cmd("query-status")["return"] == {"running": False, "singlestep": False,
                                                   "status": "paused"}
        assert q.cmd("stop") == {"return": {}}, "stop while paused is accepted"
        assert q.cmd("cont") == {"return": {}}
        q.wait_event("RESUME")
        vm.wait_for(rf"^heartbeat {int(beats[-1]) + 1}$")
        assert q.cmd("query-status")["return"]["status"] == "running"
        q.cmd("quit")


def test_start_paused(kvm, guest_elf, tmp_path):
    with VmProcess(["-S", "-kernel", str(guest_elf)], tmp_path) as vm:
        q = vm.qmp()
        assert q.cmd("query-status")["return"]["status"] == "paused"
        time.sleep(0.3)
        assert vm.output == ""
        q.cmd("cont")
        vm.wait_for(r"^SVGUEST v1 booted$")
        q.cmd("quit")
        assert vm.wait() == 0


def test_serial_file(kvm, guest_elf, tmp_path):
    out = tmp_path / "serial.log"
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hbmax=1",
                    "-serial", f"file,path={out}"], tmp_path, serial=False) as vm:
        assert vm.wait() == 0
    text = out.read_text()
    assert text.startswith("SVGUEST v1 booted\n") and "heartbeat 1\n" in text


def test_daemonize_and_pidfile(kvm, guest_elf, tmp_path):
    pidfile = tmp_path / "vm.pid"
    sock = tmp_path / "d.sock"
    out = tmp_path / "serial.log"
    r = run_cli(["-daemonize", "-pidfile", str(pidfile), "-kernel", str(guest_elf),
                 "-serial", f"file,path={out}", "-qmp", f"unix:{sock},server,nowait"])
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, 0)
        q = QmpClient(str(sock))
        assert q.cmd("query-status")["return"]["status"] == "running"
        deadline = time.time() + 30
        while "heartbeat 1" not in out.read_text() and time.time() < deadline:
            time.sleep(0.05)
        assert "heartbeat 1" in out.read_text()
        q.cmd("quit")
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("daemon did not exit after quit")
        assert not pidfile.exists()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_daemonize_reports_startup_errors(kvm, tmp_path):
    r = run_cli(["-daemonize", "-kernel", str(tmp_path / "missing"),
                 "-qmp", f"unix:{tmp_path}/d.sock,server,nowait"])
    assert r.returncode == 1
    assert "kernel file" in r.stderr and "does not exist" in r.stderr


def test_initrd_is_loaded_and_announced(kvm, guest_elf, tmp_path):
    initrd = tmp_path / "initrd.img"
    payload = b"INITRD-PAYLOAD-0123456789" * 1000
    initrd.write_bytes(payload)
    with VmProcess(["-m", "128", "-kernel", str(guest_elf), "-initrd", str(initrd),
                    "-append", "sv.hbmax=1"], tmp_path) as vm:
        m = vm.wait_for(r"^initrd: addr (0x[0-9a-f]+) size (\d+) first ([0-9a-f]+)$")
        assert vm.wait() == 0
    addr, size, first = int(m.group(1), 16), int(m.group(2)), bytes.fromhex(m.group(3))
    assert size == len(payload) and first == payload[:16]
    assert addr % 4096 == 0 and addr + size <= 128 << 20        # page-aligned, at the top of RAM


def test_missing_initrd(kvm, guest_elf, tmp_path):
    r = run_cli(["-kernel", str(guest_elf), "-initrd", str(tmp_path / "none"),
                 "-qmp", f"unix:{tmp_path}/s,server,nowait"])
    assert r.returncode == 1 and "initrd file" in r.stderr and "does not exist" in r.stderr


def test_serial_socket(kvm, guest_elf, tmp_path):
    import socket as sk
    path = tmp_path / "serial.sock"
    with VmProcess(["-S", "-kernel", str(guest_elf), "-append", "sv.hbmax=1",
                    "-serial", f"socket,path={path},server,nowait"], tmp_path, serial=False) as vm:
        q = vm.qmp()
        c = sk.socket(sk.AF_UNIX)
        c.connect(str(path))
        q.cmd("cont")
        c.settimeout(20)
        got = b""
        while b"heartbeat 1\n" not in got:
            chunk = c.recv(4096)
            if not chunk:
                break
            got += chunk
        assert got.startswith(b"SVGUEST v1 booted\n") and b"heartbeat 1\n" in got
        assert vm.wait() == 0


def test_serial_pty(kvm, guest_elf, tmp_path):
    # The guest keeps running: one that powered off after its first heartbeat closed the
    # pty under a slow reader, whose read then failed with EIO (seen under load).
    with VmProcess(["-S", "-kernel", str(guest_elf), "-serial", "pty"],
                   tmp_path, serial=False) as vm:
        q = vm.qmp()
        deadline = time.time() + 10
        while "/dev/pts/" not in vm.stderr and time.time() < deadline:
            time.sleep(0.02)
        pts = re.search(r"(/dev/pts/\d+)", vm.stderr).group(1)
        fd = os.open(pts, os.O_RDONLY | os.O_NOCTTY)
        try:
            q.cmd("cont")
            got = b""
            while b"heartbeat 1" not in got and time.time() < deadline + 20:
                got += os.read(fd, 4096)
            assert b"SVGUEST v1 booted" in got
        finally:
            os.close(fd)


def test_serial_stdin_reaches_the_guest(kvm, guest_elf, tmp_path):
    proc = subprocess.Popen(stratovirt_cmd() + [
        "-kernel", str(guest_elf), "-append", "sv.serin sv.hbmax=1",
        "-qmp", f"unix:{tmp_path}/s,server,nowait", "-serial", "stdio"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = b""
        while b"serial-in: ready" not in line:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        proc.stdin.write(b"typed by the host\n")
        proc.stdin.flush()
        rest = proc.stdout.read().decode()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "serial-in: typed by the host\n" in rest


def test_terminal_mode_is_restored(kvm, guest_elf, tmp_path):
    """-serial stdio on a terminal: raw while the VM runs, as it was after it exits."""
    import pty
    import termios
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    try:
        proc = subprocess.Popen(stratovirt_cmd() + [
            "-kernel", str(guest_elf), "-append", "sv.hb=20",
            "-qmp", f"unix:{tmp_path}/s,server,nowait", "-serial", "stdio"],
            stdin=slave, stdout=slave, stderr=subprocess.PIPE)
        got = b""
        deadline = time.time() + 30
        while b"heartbeat 1" not in got and time.time() < deadline:
            got += os.read(master, 4096)
        during = termios.tcgetattr(slave)
        assert not during[3] & termios.ICANON and not during[3] & termios.ECHO
        q = QmpClient(f"{tmp_path}/s")
        q.cmd("quit")
        assert proc.wait(30) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_serial_on_a_named_chardev(kvm, guest_elf, tmp_path):
    out = tmp_path / "com1.log"
    with VmProcess(["-kernel", str(guest_elf), "-append", "sv.hbmax=1",
                    "-chardev", f"file,id=com1,path={out}", "-serial", "chardev:com1"],
                   tmp_path, serial=False) as vm:
        assert vm.wait() == 0
    assert out.read_text().startswith("SVGUEST v1 booted\n")
