"""Shared helpers for the benchmarks: stratovirt-py beside QEMU ``-M microvm``.

Both VMMs are spawned the same way (``subprocess.Popen``, serial console on stdout, QMP
on a unix socket) and timed the same way: ``t0`` is taken just before ``Popen``; serial
lines are timestamped by a reader thread when the bytes arrive on the pipe; QMP
readiness is the moment the QMP greeting has been read.

On the project's machines /dev/kvm is software virtualization (PVM): only ratios of
numbers taken in the same run mean anything.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HEARTBEAT = re.compile(rb"^heartbeat (\d+)$")
# Our VMM as its own process: a pool on the default socket must not serve it.
NO_POOL_ENV = dict(os.environ, STRATOVIRT_POOL="off")
BANNER = b"SVGUEST v1 booted"


# ---------------------------------------------------------------- peers / set-up

def stratovirt_exe() -> List[str]:
    """The installed console script next to this interpreter (what users run)."""
    env = os.environ.get("STRATOVIRT")
    if env:
        return [env]
    for d in (os.path.dirname(sys.executable), str(REPO / ".venv" / "bin")):
        exe = os.path.join(d, "stratovirt")
        if os.path.exists(exe):
            return [exe]
    return [sys.executable, "-m", "stratovirt_py"]


class Pool:
    """A ``stratovirt-pool`` for the run: ``env`` makes ``stratovirt`` fork VMs from it."""

    def __init__(self, tmp: str):
        path = os.path.join(tmp, "pool.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "stratovirt_py.pool", "--socket", path],
                                     stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        if self.proc.stdout.readline().strip() != "stratovirt-pool: ready":
            raise RuntimeError("stratovirt-pool did not start")
        self.env = dict(os.environ, STRATOVIRT_POOL=path)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def ensure_qemu() -> Optional[str]:
    """Path of qemu-system-x86_64; installs it with apt when missing and run as root."""
    exe = shutil.which("qemu-system-x86_64")
    if exe:
        return exe
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("qemu-system-x86_64 not found: installing qemu-system-x86 with apt-get",
              file=sys.stderr)
        subprocess.run(["apt-get", "update"], check=False)
        subprocess.run(["apt-get", "install", "-y", "qemu-system-x86"], check=False)
        exe = shutil.which("qemu-system-x86_64")
        if exe:
            return exe
    print("qemu-system-x86_64 is needed as the peer: install it with\n"
          "    sudo apt-get install -y qemu-system-x86", file=sys.stderr)
    return None


def qemu_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def guest_elf() -> str:
    from stratovirt_py.guest.build import build_guest
    return str(build_guest("elf"))


def stratovirt_argv(kernel: str, mem_mib: int, append: str, qmp: str,
                    extra: Sequence[str] = ()) -> List[str]:
    return stratovirt_exe() + ["-machine", "microvm", "-m", str(mem_mib), "-kernel", kernel,
                               "-append", append, *extra,
                               "-qmp", f"unix:{qmp},server,nowait", "-serial", "stdio"]


def qemu_argv(qemu: str, kernel: str, mem_mib: int, append: str, qmp: str,
              extra: Sequence[str] = ()) -> List[str]:
    return [qemu, "-M", "microvm,acpi=off", "-enable-kvm", "-m", str(mem_mib),
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-append", append, *extra,
            "-qmp", f"unix:{qmp},server,nowait"]


def bench_dir(prefix: str, base: Optional[str] = None) -> str:
    """A scratch directory on a real filesystem (/var/tmp is ext4 here, /tmp may be tmpfs)."""
    return tempfile.mkdtemp(prefix=prefix, dir=base or "/var/tmp")


def random_file(path: str, size: int) -> None:
    """``size`` bytes from os.urandom (incompressible, no zero pages)."""
    chunk = 8 << 20
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def drop_file_cache(paths: Iterable[str]) -> None:
    """Evict clean page-cache pages of these files (POSIX_FADV_DONTNEED)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def tree_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    out = []
    for root, _dirs, files in os.walk(path):
        out.extend(os.path.join(root, f) for f in files)
    return out


def disk_usage(path: str) -> Dict[str, int]:
    """Apparent size and allocated bytes (st_blocks * 512) of a file or a tree."""
    apparent = alloc = 0
    seen = set()
    for f in tree_files(path):
        st = os.lstat(f)
        if (st.st_dev, st.st_ino) in seen or not os.path.isfile(f) or os.path.islink(f):
            continue
        seen.add((st.st_dev, st.st_ino))
        apparent += st.st_size
        alloc += st.st_blocks * 512
    return {"apparent": apparent, "allocated": alloc}


# ---------------------------------------------------------------- a running VMM

class Vmm:
    """One VMM process: serial lines timestamped as they arrive, QMP on demand."""

    def __init__(self, name: str, argv: List[str], qmp_path: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None):
        self.name = name
        self.argv = argv
        self.qmp_path = qmp_path
        self.lines: List[tuple] = []          # (t_ms since spawn, bytes)
        self.first_byte: Optional[float] = None
        self._buf = b""
        self._cond = threading.Condition()
        self._eof = False
        self._qmp: Optional[Qmp] = None
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self._errbuf = b""
        threading.Thread(target=self._pump_err, daemon=True).start()

    def ms(self, t: float) -> float:
        return (t - self.t0) * 1000.0

    def _pump(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            now = time.perf_counter()
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                if self.first_byte is None:
                    self.first_byte = self.ms(now)
                self._buf += chunk
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    self.lines.append((self.ms(now), line.rstrip(b"\r")))
                self._cond.notify_all()

    def _pump_err(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            self._errbuf += chunk

    def stderr_text(self) -> str:
        return self._errbuf.decode(errors="replace")

    def wait_line(self, pred, timeout: float = 60.0, start: int = 0):
        """(t_ms, line, index) of the first line from index ``start`` that matches."""
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    m = pred(line)
                    if m:
                        return t, line, i
                    i += 1
                if self._eof:
                    time.sleep(0.05)
                    raise RuntimeError(f"{self.name}: output ended (rc={self.proc.poll()}) "
                                       f"before the expected line; stderr: "
                                       f"{self.stderr_text()[-1500:]!r}; last lines: "
                                       f"{[l for _, l in self.lines[-5:]]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no expected line within {timeout} s; "
                                       f"last lines: {[l for _, l in self.lines[-5:]]}; "
                                       f"stderr: {self.stderr_text()[-800:]!r}")
                self._cond.wait(left)

    def wait_heartbeat(self, timeout: float = 60.0, start: int = 0, min_n: int = 0):
        """(t_ms, n) of the first ``heartbeat N`` line (N >= min_n)."""
        def pred(line):
            m = HEARTBEAT.match(line)
            return m if m and int(m.group(1)) >= min_n else None
        t, line, _ = self.wait_line(pred, timeout, start)
        return t, int(HEARTBEAT.match(line).group(1))

    def wait_first_byte(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.first_byte is None:
                if self._eof or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no serial output; "
                                       f"stderr {self.stderr_text()[-800:]!r}")
                self._cond.wait(0.5)
            return self.first_byte

    def qmp(self, timeout: float = 30.0) -> "Qmp":
        if self._qmp is None:
            self._qmp = Qmp.connect(self.qmp_path, timeout=timeout, proc=self.proc)
            self.qmp_ready_ms = self.ms(self._qmp.ready_at)
        return self._qmp

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def quit(self, timeout: float = 10.0) -> None:
        """Ask for a clean exit over QMP, kill if it does not happen."""
        try:
            self.qmp().execute("quit")
            self.proc.wait(timeout)
        except Exception:  # noqa: BLE001 - fall back to kill
            pass
        self.kill()


class Qmp:
    """A minimal QMP client (works with QEMU and stratovirt-py alike)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = b""
        self.events: List[dict] = []
        self.greeting = self._read()
        self.ready_at = time.perf_counter()
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: str, timeout: float = 30.0, proc=None, poll: float = 0.001) -> "Qmp":
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                s.settimeout(timeout)
                return cls(s)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"VMM exited (rc={proc.returncode}) before its QMP "
                                       f"socket {path} was ready")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QMP socket {path} not ready in {timeout} s")
                time.sleep(poll)

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd: str, args: Optional[dict] = None) -> dict:
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {cmd}: {r['error']}")
            return r.get("return", {})

    def wait_migration(self, timeout: float = 300.0, poll: float = 0.001) -> str:
        """Poll query-migrate until it is no longer setup/active; return the final status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.execute("query-migrate").get("status", "none")
            if st not in ("setup", "active", "device", "pre-switchover", "wait-unplug",
                          "postcopy-active"):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration still {st} after {timeout} s")
            time.sleep(poll)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- memory accounting

def smaps_rollup(pid: int) -> Dict[str, int]:
    """Fields of /proc/PID/smaps_rollup in bytes (Rss, Pss, Pss_Anon, Pss_File, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


# ---------------------------------------------------------------- statistics / load

def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def quantiles(xs: Sequence[float]) -> Dict[str, float]:
    """min, p25, median, p75, max (p25/p75 by linear interpolation)."""
    if not xs:
        return {}
    s = sorted(xs)

    def q(p):
        k = (len(s) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)
    return {"n": len(s), "min": s[0], "p25": q(0.25), "median": q(0.5), "p75": q(0.75),
            "max": s[-1]}


class CpuLoad:
    """Whole-machine CPU utilization between start() and stop() from /proc/stat."""

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle

    def __init__(self):
        self.total0, self.idle0 = self._read()
        self.load0 = os.getloadavg()

    def stop(self) -> Dict[str, object]:
        total, idle = self._read()
        dt = max(total - self.total0, 1)
        busy = 100.0 * (1 - (idle - self.idle0) / dt)
        return {"busy_pct": round(busy, 1), "loadavg_before": self.load0,
                "loadavg_after": os.getloadavg(), "ncpu": os.cpu_count()}


def machine_info() -> Dict[str, str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    kvm = "absent"
    if os.path.exists("/dev/kvm"):
        kvm = "present"
        if os.path.isdir("/sys/module/kvm_pvm"):
            kvm = "kvm_pvm (PVM software virtualization, no VMX/SVM)"
        elif os.path.isdir("/sys/module/kvm_intel") or os.path.isdir("/sys/module/kvm_amd"):
            kvm = "hardware (kvm_intel/kvm_amd)"
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "kvm": kvm, "python": platform.python_version()}


def header(title: str, qemu: Optional[str]) -> None:
    mi = machine_info()
    print(f"# {title}  ({time.strftime('%Y-%m-%d %H:%M %Z')})")
    print(f"# machine: {mi['nproc']} CPUs, {mi['cpu']}, kernel {mi['kernel']}, /dev/kvm {mi['kvm']}")
    print(f"# peer: {qemu_version(qemu) if qemu else 'none'};  ours: {' '.join(stratovirt_exe())}")
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print("# timings on software KVM: compare the ratio ours/QEMU, not absolute values\n",
          flush=True)


# ---------------------------------------------------------------- output

def fmt(v, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(v, spec)


def ratio(a, b) -> str:
    if a is None or b is None or not b or a != a or b != b:
        return "-"
    return f"{a / b:.2f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], title: str = "") -> str:
    rows = [[str(c) for c in r] for r in rows]
    if title:
        print(f"\n{title}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2)
                            for i, w in enumerate(widths)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                                       for i, (c, w) in enumerate(zip(r, widths))) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Optional[str], name: str, data: dict) -> None:
    if not path:
        return
    doc = {"bench": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": [os.path.basename(sys.executable)] + sys.argv,
           "machine": machine_info(), **data}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nresults written to {path}")
