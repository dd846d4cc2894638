"""virtio-net: stratovirt-py beside QEMU with the same test guest, over a tap in a netns.

    sudo .venv/bin/python benches/net.py [--reps 3] [--frames 2000] [--tx-frames 3000]
                                         [--tx-len 60] [--rx-len 60] [--parts rx,tx]

``STRATOVIRT_BEFORE=<executable>`` adds another build of ours as a third peer (same run).

What the test guest allows us to measure (``sv.net`` sends one PING, then waits for a
frame of EtherType 0x88B5 and answers it once, dropping and re-posting every other frame;
``sv.netbench=tx,<count>,<len>`` transmits a burst):

* host -> guest frames/s: inject N frames of EtherType 0x88B6 (the guest takes each one
  from its 8 receive buffers, drops it and re-posts the buffer: every frame is a full trip
  through the device) followed by one 0x88B5 frame; the rate is (N + 1) / (time from the
  first injected frame to the guest's PONG on the tap).
* round trip: inject one 0x88B5 frame, time until the PONG comes back (includes the
  guest printing its ``net: got ...`` line on the serial port, one port write per byte).
* spawn -> PING: process start to the guest's first frame on the tap (boot included).

* guest -> host frames/s (``sv.netbench=tx,N,len``): the guest transmits N broadcast
  frames of EtherType 0x88B6 (a big-endian sequence number, then zeros), up to 16 in
  flight, polling the used ring; an AF_PACKET socket on the tap (64 MiB receive buffer,
  kernel receive timestamps) counts them.  Two rates: N / the guest's TSC time from the
  first submission to the last completion (``netbench: tx N len cycles tsc_khz``), and
  (frames received - 1) / (last - first host receive timestamp).  Frames lost on the
  way are counted and reported.

Both VMMs run in the same namespace set-up, one after the other, same guest, same
tap settings; each number is the median over the repetitions.  Timings on these
machines (nested, emulated CPL0) are only meaningful as ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ETH_SV = 0x88B5
ETH_OTHER = 0x88B6
GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("020000000001")
PACKET_OUTGOING = 4
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


class Netns:
    def __init__(self):
        self.name = f"svbench-{uuid.uuid4().hex[:8]}"
        sh("ip", "netns", "add", self.name)
        self.exec = ["ip", "netns", "exec", self.name]
        sh(*self.exec, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
           "net.ipv6.conf.default.disable_ipv6=1", check=False)
        sh(*self.exec, "ip", "tuntap", "add", "svtap0", "mode", "tap")
        sh(*self.exec, "ip", "link", "set", "svtap0", "txqueuelen", "10000", "up")

    def run_in(self, fn):
        out = {}

        def run():
            try:
                fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                out["v"] = fn()
            except BaseException as e:  # noqa: BLE001
                out["e"] = e
        t = threading.Thread(target=run)
        t.start()
        t.join()
        if "e" in out:
            raise out["e"]
        return out["v"]

    def close(self):
        sh("ip", "netns", "del", self.name, check=False)


class Wire:
    def __init__(self, ns: Netns):
        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_SV))
            s.bind(("svtap0", ETH_SV))
            t = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)   # sends any EtherType
            t.bind(("svtap0", 0))
            return s, t
        self.rx, self.tx = ns.run_in(make)

    def recv(self, timeout=60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the guest")
            self.rx.settimeout(left)
            data, addr = self.rx.recvfrom(65536)
            if addr[2] != PACKET_OUTGOING:
                return data

    def frame(self, etype: int, payload: bytes) -> bytes:
        f = GUEST_MAC + HOST_MAC + etype.to_bytes(2, "big") + payload
        return f + bytes(max(0, 60 - len(f)))

    def close(self):
        self.rx.close()
        self.tx.close()


RX_APPEND = "sv.net sv.netwait=60000 sv.hb=0"


def stratovirt_argv(guest: Path, tmp: str, append: str = RX_APPEND):
    exe = shutil.which("stratovirt", path=os.path.dirname(sys.executable))
    base = [exe] if exe else [sys.executable, "-m", "stratovirt_py"]
    return base + ["-m", "128", "-kernel", str(guest),
                   "-append", append,
                   "-netdev", "tap,id=n0,ifname=svtap0",
                   "-device", "virtio-net-device,id=net0,netdev=n0,mac=52:54:00:12:34:56",
                   "-qmp", f"unix:{tmp}/qmp-{uuid.uuid4().hex[:6]}.sock,server,nowait",
                   "-serial", "stdio"]


def qemu_argv(guest: Path, tmp: str, append: str = RX_APPEND):
    return ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-m", "128",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", str(guest), "-append", append,
            "-global", "virtio-mmio.force-legacy=false",
            "-netdev", "tap,id=n0,ifname=svtap0,script=no,downscript=no",
            "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"]


def one_run(argv, frames: int, length: int = 60):
    """(spawn->PING s, seconds from the first injected frame to the PONG)."""
    ns = Netns()
    wire = Wire(ns)
    proc = None
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(ns.exec + argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ping = wire.recv()
        t_ping = time.perf_counter() - t0
        assert ping[6:12] == GUEST_MAC and b"SVGUEST-NET-PING" in ping, ping[:40]
        time.sleep(0.2)              # let the guest settle into its receive loop
        other = wire.frame(ETH_OTHER, b"FILLER" + bytes(max(0, length - 20)))
        last = wire.frame(ETH_SV, b"SVBENCH")
        send = wire.tx.send
        t1 = time.perf_counter()
        for _ in range(frames):
            send(other)
        send(last)
        pong = wire.recv()
        dt = time.perf_counter() - t1
        assert pong[:6] == HOST_MAC and b"SVGUEST-NET-PONG" in pong, pong[:40]
        return t_ping, dt
    finally:
        if proc is not None:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            if proc.returncode not in (0, -9) and err:
                sys.stderr.write(err.decode(errors="replace")[-2000:])
        wire.close()
        ns.close()


SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33


class TxCounter:
    """Frames of EtherType 0x88B6 the guest sends, with kernel receive timestamps."""

    def __init__(self, ns: Netns):
        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_OTHER))
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.bind(("svtap0", ETH_OTHER))
            return s
        self.sock = ns.run_in(make)
        self.stamps = []          # (kernel receive time s, sequence number)
        self.bad = 0

    def collect(self, count: int, deadline: float) -> None:
        while len(self.stamps) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65536, 64)
            except (TimeoutError, socket.timeout):
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            if data[6:12] != GUEST_MAC or len(data) < 18:
                self.bad += 1
                continue
            ts = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", cdata[:16])
                    ts = sec + nsec * 1e-9
            self.stamps.append((ts if ts is not None else time.time(),
                                int.from_bytes(data[14:18], "big")))

    def close(self):
        self.sock.close()


def one_tx_run(mk, guest: Path, tmp: str, count: int, length: int):
    """Guest -> host burst: (guest-timed frames/s, host-timed frames/s, frames lost, out of order)."""
    ns = Netns()
    counter = TxCounter(ns)
    proc = None
    try:
        argv = mk(guest, tmp, f"sv.netbench=tx,{count},{length} sv.hb=0")
        proc = subprocess.Popen(ns.exec + argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        result = {}

        def serial():
            for raw in proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("netbench: "):
                    result.setdefault("lines", []).append(line)
                    if line.startswith(("netbench: tx ", "netbench: timeout", "netbench: no ",
                                        "netbench: bad")):
                        result["done"] = line
                        return
        t = threading.Thread(target=serial, daemon=True)
        t.start()
        counter.collect(count, time.monotonic() + 120)
        t.join(30)
        done = result.get("done", "")
        if not done.startswith("netbench: tx "):
            raise RuntimeError(f"guest did not finish the burst: {result.get('lines')}")
        _, _, n, ln, cycles, khz = done.split()
        assert int(n) == count and int(ln) == length, done
        if any(x.startswith("netbench: errors") for x in result["lines"]):
            print(f"warning: {result['lines']}", file=sys.stderr)
        guest_rate = count / (int(cycles) / (int(khz) * 1000.0))
        # frames still in the socket after the guest reported completion
        counter.collect(count, time.monotonic() + 0.5)
        st = counter.stamps
        seqs = [q for _, q in st]
        host_rate = (len(st) - 1) / (st[-1][0] - st[0][0]) if len(st) > 1 else 0.0
        lost = count - len(set(seqs) & set(range(count)))
        disorder = sum(1 for a_, b_ in zip(seqs, seqs[1:]) if b_ != a_ + 1)
        return guest_rate, host_rate, lost, disorder
    finally:
        if proc is not None:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            if proc.returncode not in (0, -9) and err:
                sys.stderr.write(err.decode(errors="replace")[-2000:])
        counter.close()
        ns.close()


def cpu_stat():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + (v[4] if len(v) > 4 else 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--tx-frames", type=int, default=3000,
                    help="frames per guest -> host burst (sv.netbench=tx)")
    ap.add_argument("--tx-len", type=int, default=60,
                    help="bytes per transmitted frame incl. the 14-byte Ethernet header (18..1514)")
    ap.add_argument("--rx-len", type=int, default=60,
                    help="bytes per injected frame incl. the Ethernet header (60..1514)")
    ap.add_argument("--parts", default="rx,tx",
                    help="rx: host -> guest rate, round trip, boot; tx: guest -> host rate")
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    if os.geteuid() != 0:
        print("benches/net.py needs root (network namespace and taps)", file=sys.stderr)
        return 2
    from stratovirt_py.guest.build import build_guest
    guest = build_guest("elf")
    tmp = tempfile.mkdtemp(prefix="svnetbench-")
    peers = [("stratovirt-py", stratovirt_argv)]
    # STRATOVIRT_BEFORE: another build of ours (an older commit) as a third peer, so that
    # before/after ratios come from the same run.
    before = os.environ.get("STRATOVIRT_BEFORE")
    if before:
        def before_argv(guest, tmp, append=RX_APPEND):
            return [before] + stratovirt_argv(guest, tmp, append)[1:]
        peers.append(("before", before_argv))
    if not a.no_qemu and shutil.which("qemu-system-x86_64"):
        peers.append(("QEMU", qemu_argv))
    samples = {name: {"rate": [], "rtt": [], "boot": [], "txg": [], "txh": [], "lost": [],
                      "disorder": []} for name, _ in peers}
    cpu0, load0 = cpu_stat(), os.getloadavg()
    try:
        # Interleaved (one run of each peer per repetition) so that a change in the
        # machine's load hits both alike.
        for _ in range(a.reps):
            for name, mk in peers:
                if "rx" in parts:
                    t_ping, dt = one_run(mk(guest, tmp), 0)
                    samples[name]["boot"].append(t_ping)
                    samples[name]["rtt"].append(dt)
                    _, dt = one_run(mk(guest, tmp), a.frames, a.rx_len)
                    samples[name]["rate"].append((a.frames + 1) / dt)
                if "tx" in parts:
                    g, h, lost, dis = one_tx_run(mk, guest, tmp, a.tx_frames, a.tx_len)
                    samples[name]["txg"].append(g)
                    samples[name]["txh"].append(h)
                    samples[name]["lost"].append(lost)
                    samples[name]["disorder"].append(dis)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu1, load1 = cpu_stat(), os.getloadavg()
    busy = 100.0 * (1 - (cpu1[1] - cpu0[1]) / max(cpu1[0] - cpu0[0], 1))
    results = {}
    for name, smp in samples.items():
        results[name] = {k: statistics.median(v) for k, v in smp.items() if v}
        if "rx" in parts:
            print(f"{name}: rate {sorted(int(r) for r in smp['rate'])} /s, rtt "
                  f"{[round(r * 1000, 2) for r in sorted(smp['rtt'])]} ms, spawn->PING "
                  f"{[round(b * 1000) for b in sorted(smp['boot'])]} ms", file=sys.stderr)
        if "tx" in parts:
            print(f"{name}: tx guest-timed {sorted(int(r) for r in smp['txg'])} /s, host-timed "
                  f"{sorted(int(r) for r in smp['txh'])} /s, lost {smp['lost']}, "
                  f"out of order {smp['disorder']}", file=sys.stderr)
    print(f"machine: {os.cpu_count()} CPUs, {busy:.0f}% busy during the run, load average "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after", file=sys.stderr)
    rows = []
    if "rx" in parts:
        rows += [("host -> guest frames/s (%d x %d B)" % (a.frames, a.rx_len), "rate", "{:.0f}",
                  False),
                 ("inject -> reply round trip (ms)", "rtt", "{:.2f}", True),
                 ("spawn -> guest's first frame (ms)", "boot", "{:.0f}", True)]
    if "tx" in parts:
        rows += [("guest -> host frames/s, guest TSC (%d x %d B)" % (a.tx_frames, a.tx_len),
                  "txg", "{:.0f}", False),
                 ("guest -> host frames/s, host timestamps (%d x %d B)" % (a.tx_frames, a.tx_len),
                  "txh", "{:.0f}", False)]
    py = results["stratovirt-py"]
    q = results.get("QEMU")
    b = results.get("before")
    head = "| measurement (median of %d) | stratovirt-py | QEMU | stratovirt-py / QEMU |" % a.reps
    print(head + (" before | before / QEMU |" if b else ""))
    print("| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if b else ""))
    for label, key, fmt, is_time in rows:
        scale = 1000 if is_time else 1
        pv = py[key] * scale
        qv = q[key] * scale if q else None
        line = f"| {label} | {fmt.format(pv)} | "
        line += f"{fmt.format(qv)} | {pv / qv:.2f} |" if qv else "- | - |"
        if b:
            bv = b[key] * scale
            line += f" {fmt.format(bv)} | " + (f"{bv / qv:.2f} |" if qv else "- |")
        print(line)
    if "tx" in parts:
        for name, r in results.items():
            if r.get("lost") or r.get("disorder"):
                print(f"{name}: median {r['lost']:.0f} of {a.tx_frames} frames lost, "
                      f"{r['disorder']:.0f} out of order on the tap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
