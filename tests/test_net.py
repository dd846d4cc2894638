"""virtio-net with the real VMM and the test guest (``sv.net``), over taps in a network
namespace each test creates and deletes: frames both ways, an inherited tap fd, start-up
errors, and snapshot/restore onto the same and onto another tap.

Host side: an AF_PACKET socket bound to the tap (created on a thread that joined the
namespace) sees what the guest sends and injects what the guest should receive.  Nothing
leaves the namespace: the taps have no other link.
"""

import os
import re
import shutil
import socket
import subprocess
import time
import uuid

import pytest

from nettools import in_netns
from vmtools import VmProcess, run_cli, stratovirt_cmd

from stratovirt_py.devices.virtio.net import default_mac, format_mac

pytestmark = pytest.mark.kvm

MEM = "128"
ETH_SV = 0x88B5
ETH_BENCH = 0x88B6
GUEST_MAC = "52:54:00:12:34:56"
HOST_MAC = bytes.fromhex("020000000001")
PACKET_OUTGOING = 4


# -- the namespace and its taps ----------------------------------------------------------------
def _ip(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=20)


@pytest.fixture
def netns(request):
    if os.geteuid() != 0:
        pytest.skip("the net tests create a network namespace and taps: they need root")
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        pytest.skip("/dev/net/tun is not usable")
    try:
        _ip("ip", "-V")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the ip command is missing")
    name = f"svnet-{uuid.uuid4().hex[:8]}"
    _ip("ip", "netns", "add", name)
    request.addfinalizer(lambda: _ip("ip", "netns", "del", name, check=False))
    _ip("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
        ns=name, check=False)
    for tap in ("svtap0", "svtap1"):
        _ip("ip", "tuntap", "add", tap, "mode", "tap", ns=name)
        _ip("ip", "link", "set", tap, "up", ns=name)
    return name


class Wire:
    """Raw frames of EtherType 0x88B5 (or ``etype``) on one tap, seen from the host."""

    def __init__(self, ns, ifname, etype=ETH_SV):
        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(etype))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((ifname, etype))
            return s
        self.sock = in_netns(ns, make)
        self.ifname = ifname

    def recv(self, timeout=20.0):
        """The next frame the guest sent (our own injections are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no frame from the guest on {self.ifname}")
            self.sock.settimeout(left)
            data, addr = self.sock.recvfrom(65536)
            if addr[2] != PACKET_OUTGOING:
                return data

    def send(self, dst: bytes, payload: bytes, src: bytes = HOST_MAC) -> None:
        f = dst + src + ETH_SV.to_bytes(2, "big") + payload
        self.sock.send(f + bytes(max(0, 60 - len(f))))

    def close(self):
        self.sock.close()


def parse(f: bytes):
    return f[:6], f[6:12], int.from_bytes(f[12:14], "big"), f[14:].rstrip(b"\0")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


# -- the VMM ------------------------------------------------------------------------------------
class NetVm(VmProcess):
    """``VmProcess``, optionally run inside a namespace and with fds handed over."""

    def __init__(self, args, tmp, ns=None, pass_fds=()):
        super().__init__(args, tmp, prefix=["ip", "netns", "exec", ns] if ns else None,
                         pass_fds=pass_fds)


def vm_args(guest, netdev, mac=GUEST_MAC, wait_ms=20000, extra=()):
    dev = "virtio-net-device,id=net0,netdev=n0" + (f",mac={mac}" if mac else "")
    return ["-m", MEM, "-kernel", str(guest),
            "-append", f"sv.net sv.netwait={wait_ms} sv.hb=0",
            "-netdev", f"tap,id=n0,{netdev}", "-device", dev, *extra]


def ping_pong(vm, wire, mac: str, payload=b"SVGUEST-HOST-HELLO", start=0):
    """Inject a frame for the guest; check it arrives and the guest's reply comes back."""
    wire.send(mac_bytes(mac), payload)
    vm.wait_for(rf"^net: got {payload.decode()}$", start=start)
    dst, src, etype, body = parse(wire.recv())
    assert (dst, src, etype, body) == (HOST_MAC, mac_bytes(mac), ETH_SV, b"SVGUEST-NET-PONG")
    vm.wait_for(r"^net: replied$", start=start)


def expect_ping(vm, wire, mac: str):
    vm.wait_for(rf"^net: mac {mac}$")
    dst, src, etype, body = parse(wire.recv())
    assert (dst, src, etype, body) == (b"\xff" * 6, mac_bytes(mac), ETH_SV, b"SVGUEST-NET-PING")
    vm.wait_for(r"^net: sent$")


def frames_both_ways_then_quit(vm, wire, mac=GUEST_MAC):
    """The guest's ping arrives, an injected frame gets its reply; a clean quit, nothing on stderr."""
    expect_ping(vm, wire, mac)
    ping_pong(vm, wire, mac)
    quit_vm(vm)
    assert vm.stderr == "", vm.stderr


def quit_vm(vm):
    q = vm.qmp()
    q.cmd("quit")
    assert vm.wait() == 0


def wait_migrate(q, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        info = q.cmd("query-migrate")["return"]
        if info["status"] not in ("setup", "active") or time.monotonic() > deadline:
            return info
        time.sleep(0.01)


# -- tests ----------------------------------------------------------------------------------------
def test_frames_both_ways_on_a_named_tap(kvm, netns, guest_elf, tmp_path):
    wire = Wire(netns, "svtap0")
    try:
        with NetVm(vm_args(guest_elf, "ifname=svtap0"), tmp_path, ns=netns) as vm:
            frames_both_ways_then_quit(vm, wire)
    finally:
        wire.close()


@pytest.mark.parametrize("queues", [1, 2])
def test_inherited_fds_and_default_mac(kvm, netns, guest_elf, tmp_path, queues):
    """``fd=N``, and Kata's ``fds=N:M`` (a multi-queue tap: the VMM uses one queue)."""
    import fcntl
    from stratovirt_py.devices import tap as T
    flags = T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR | (T.IFF_MULTI_QUEUE if queues > 1 else 0)
    name = "svmq0" if queues > 1 else "svtap1"

    def open_tap():
        fds = []
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(fd, T.TUNSETIFF, T._ifreq(name, flags))
            fds.append(fd)
        _ip("ip", "link", "set", name, "up", ns=netns)
        return fds
    fds = in_netns(netns, open_tap)
    wire = Wire(netns, name)
    mac = format_mac(default_mac("net0"))
    opt = f"fd={fds[0]}" if queues == 1 else "fds=" + ":".join(map(str, fds))
    try:
        # the VMM itself runs outside the namespace: the fds are all it needs
        with NetVm(vm_args(guest_elf, opt, mac=None), tmp_path, pass_fds=fds) as vm:
            for fd in fds:
                os.close(fd)
            fds = []
            expect_ping(vm, wire, mac)
            ping_pong(vm, wire, mac, b"VIA-AN-FD")
            quit_vm(vm)
            if queues > 1:
                assert "multiqueue is not supported" in vm.stderr
    finally:
        for fd in fds:
            os.close(fd)
        wire.close()


def _one_line_error(proc_or_res, *needles):
    err = proc_or_res.stderr
    assert proc_or_res.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_startup_errors(kvm, guest_elf, tmp_path):
    sock = f"unix:{tmp_path}/q.sock,server,nowait"
    base = ["-qmp", sock]
    res = run_cli(vm_args(guest_elf, "ifname=svtap0", mac="52:54:00:zz:00:01") + base)
    _one_line_error(res, "stratovirt: ", "virtio-net-device,id=net0", "invalid mac '52:54:00:zz:00:01'")
    res = run_cli(vm_args(guest_elf, "ifname=svtap0", mac="01:00:5e:00:00:01") + base)
    _one_line_error(res, "mac '01:00:5e:00:00:01' is a multicast address")
    res = run_cli(vm_args(guest_elf, "fd=1017") + base)
    _one_line_error(res, "netdev n0: fd 1017 is not open")
    res = run_cli(vm_args(guest_elf, "ifname=svtap0,vhost=on") + base)
    _one_line_error(res, "netdev n0: vhost-net is not supported: /dev/vhost-net")


def test_missing_or_wrong_tap_is_a_startup_error(kvm, netns, guest_elf, tmp_path):
    sock = f"unix:{tmp_path}/q.sock,server,nowait"
    argv = stratovirt_cmd() + vm_args(guest_elf, "ifname=svnosuch") + ["-qmp", sock]
    # Without CAP_NET_ADMIN the VMM cannot create the tap it names.
    if shutil.which("setpriv"):
        res = subprocess.run(["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
                              "ip", "netns", "exec", netns] + argv,
                             capture_output=True, text=True, timeout=30)
        _one_line_error(res, "netdev n0: tap device svnosuch does not exist")
    res = subprocess.run(["ip", "netns", "exec", netns] + stratovirt_cmd()
                         + vm_args(guest_elf, "ifname=lo") + ["-qmp", sock],
                         capture_output=True, text=True, timeout=30)
    _one_line_error(res, "netdev n0: lo is not a tap device")
    # no tap appeared
    assert "svnosuch" not in _ip("ip", "link", ns=netns).stdout


def test_snapshot_restore_on_same_and_other_tap(kvm, netns, guest_elf, tmp_path):
    tpl = tmp_path / "tpl"
    wire0, wire1 = Wire(netns, "svtap0"), Wire(netns, "svtap1")
    args0 = vm_args(guest_elf, "ifname=svtap0", wait_ms=600000)
    try:
        with NetVm(args0, tmp_path, ns=netns) as vm:
            expect_ping(vm, wire0, GUEST_MAC)          # now waiting for a frame
            q = vm.qmp()
            assert q.cmd("stop") == {"return": {}}
            assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
            assert wait_migrate(q)["status"] == "completed"
            # the template VM itself goes on after the snapshot
            assert q.cmd("cont") == {"return": {}}
            ping_pong(vm, wire0, GUEST_MAC, b"TEMPLATE-GOES-ON")
            q.cmd("quit")
            assert vm.wait() == 0
        for ifname, wire in (("svtap0", wire0), ("svtap1", wire1)):
            args = vm_args(guest_elf, f"ifname={ifname}", wait_ms=600000)
            with NetVm(args + ["-incoming", f"file:{tpl}"], tmp_path, ns=netns) as vm:
                vm.qmp()                                # restored and running
                ping_pong(vm, wire, GUEST_MAC, f"RESTORED-ON-{ifname}".encode())
                assert "SVGUEST v1 booted" not in vm.output
                quit_vm(vm)
        # another mac is refused and the message names it
        args = vm_args(guest_elf, "ifname=svtap1", mac="52:54:00:65:43:21", wait_ms=600000)
        vm = NetVm(args + ["-incoming", f"file:{tpl}"], tmp_path, ns=netns)
        try:
            rc = vm.wait(30)
        finally:
            vm.kill()
        assert rc == 1, vm.stderr
        assert re.search(r"mac is 52:54:00:65:43:21 but the template has 52:54:00:12:34:56",
                         vm.stderr), vm.stderr
        assert len(vm.stderr.strip().splitlines()) == 1, vm.stderr
    finally:
        wire0.close()
        wire1.close()


def test_net_hot_replace_over_qmp(kvm, netns, guest_elf, tmp_path):
    """netdev_add + device_add virtio-net-mmio fill a replaceable net slot; device_del
    empties it with DEVICE_DELETED; a snapshot then names what is plugged."""
    tpl = tmp_path / "tpl"
    args = ["-m", MEM, "-kernel", str(guest_elf), "-append", "sv.hb=50"]
    with NetVm(args, tmp_path, ns=netns) as vm:
        q = vm.qmp()
        assert q.cmd("netdev_add", id="hn0", ifname="svtap1") == {"return": {}}
        r = q.cmd("device_add", id="hnet0", driver="virtio-net-mmio", netdev="hn0", addr="0x0",
                  mac="52:54:00:aa:bb:cc")
        assert r == {"return": {}}
        r = q.cmd("device_add", id="hnet1", driver="virtio-net-mmio", netdev="hn0", addr="0x5")
        assert "out of range" in r["error"]["desc"]
        q.cmd("migrate", uri=f"file:{tpl}")
        assert wait_migrate(q)["status"] == "completed"
        q.cmd("cont")
        assert q.cmd("device_del", id="hnet0") == {"return": {}}
        assert q.wait_event("DEVICE_DELETED")["data"]["device"] == "hnet0"
        quit_vm(vm)
    r = run_cli(args + ["-incoming", f"file:{tpl}", "-qmp", f"unix:{tmp_path}/r.sock,server,nowait"])
    assert r.returncode == 1 and "virtio-net-device 'hnet0'" in r.stderr
    restored = args + ["-netdev", "tap,id=hn0,ifname=svtap0",
                       "-device", "virtio-net-device,id=hnet0,netdev=hn0,mac=52:54:00:aa:bb:cc",
                       "-incoming", f"file:{tpl}"]
    with NetVm(restored, tmp_path, ns=netns) as vm:
        vm.wait_for(r"^heartbeat \d+$")
        quit_vm(vm)


def test_guest_to_host_burst(kvm, netns, guest_elf, tmp_path):
    """``sv.netbench=tx,200,60``: 200 broadcast frames of EtherType 0x88B6, 16 in flight,
    each carrying its big-endian sequence number; all reach the tap, in order."""
    wire = Wire(netns, "svtap0", etype=ETH_BENCH)
    args = vm_args(guest_elf, "ifname=svtap0")
    args[args.index("-append") + 1] = "sv.netbench=tx,200,60 sv.hb=0"
    try:
        with NetVm(args, tmp_path, ns=netns) as vm:
            vm.wait_for(rf"^netbench: mac {GUEST_MAC}$")
            frames = [wire.recv() for _ in range(200)]
            m = vm.wait_for(r"^netbench: tx 200 60 (\d+) (\d+)$")
            assert int(m.group(1)) > 0 and int(m.group(2)) > 0
            assert "netbench: errors" not in vm.output
            for seq, f in enumerate(frames):
                assert len(f) == 60
                assert f[:6] == b"\xff" * 6 and f[6:12] == mac_bytes(GUEST_MAC)
                assert int.from_bytes(f[12:14], "big") == ETH_BENCH
                assert int.from_bytes(f[14:18], "big") == seq
                assert f[18:] == bytes(42)
            with pytest.raises((AssertionError, TimeoutError)):     # nothing more
                wire.recv(timeout=0.3)
            quit_vm(vm)
            assert vm.stderr == "", vm.stderr
    finally:
        wire.close()


def _send_fd(q, name, fd):
    import array
    msg = ('{"execute":"getfd","arguments":{"fdname":"%s"}}\n' % name).encode()
    q.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    assert q.reply() == {"return": {}}


def _vm_fd(pid, target_prefix):
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{n}").startswith(target_prefix):
                return int(n)
        except OSError:
            continue
    raise AssertionError(f"the VMM holds no {target_prefix} descriptor")


def test_netdev_add_takes_only_getfd_descriptors_once(kvm, netns, guest_elf, tmp_path):
    """A bare fd number in netdev_add could name the VMM's own KVM descriptor, which the
    tap code would then close: only getfd names are taken, each by one device."""
    import fcntl
    from stratovirt_py.devices import tap as T

    def open_tap():
        fd = os.open(T.TUN_PATH, os.O_RDWR)
        fcntl.ioctl(fd, T.TUNSETIFF, T._ifreq("svtap1", T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR))
        return fd
    args = ["-m", MEM, "-kernel", str(guest_elf), "-append", "sv.hb=50"]
    with NetVm(args, tmp_path, ns=netns) as vm:
        q = vm.qmp()
        pid = vm.proc.pid                  # ip netns exec runs the VMM in its own process
        vmfd = _vm_fd(pid, "anon_inode:kvm-vm")
        tapfd = in_netns(netns, open_tap)
        _send_fd(q, "tap1", tapfd)
        os.close(tapfd)
        for fds in (str(vmfd), f"tap1:{vmfd}", "tap1:tap1", "nosuch"):
            r = q.cmd("netdev_add", id="hn0", fds=fds)
            assert "error" in r, (fds, r)
        assert "getfd" in q.cmd("netdev_add", id="hn0", fd=str(vmfd))["error"]["desc"]
        assert q.cmd("netdev_add", id="hn0", fds="tap1") == {"return": {}}
        assert "no file descriptor named 'tap1'" in q.cmd("netdev_add", id="hn1", fds="tap1")["error"]["desc"]
        assert q.cmd("netdev_add", id="other", ifname="svtap0") == {"return": {}}
        assert q.cmd("device_add", id="onet", driver="virtio-net-mmio", netdev="other",
                     addr="0x0") == {"return": {}}
        dev = dict(id="hnet0", driver="virtio-net-mmio", netdev="hn0", addr="0x0")
        assert "occupied" in q.cmd("device_add", **dev)["error"]["desc"]   # fds not used yet
        dev["addr"] = "0x1"
        assert q.cmd("device_add", **dev) == {"return": {}}
        assert q.cmd("device_del", id="hnet0") == {"return": {}}
        r = q.cmd("device_add", **dev)
        assert "were used by a device already" in r["error"]["desc"]
        assert _vm_fd(pid, "anon_inode:kvm-vm") == vmfd
        q.cmd("stop")
        q.cmd("migrate", uri=f"file:{tmp_path}/tpl")
        assert wait_migrate(q)["status"] == "completed"
        quit_vm(vm)
