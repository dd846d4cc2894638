"""The main job, end to end, on the bundled demo guest.

1. cold-boot the demo guest and time it (process start -> banner -> first heartbeat);
2. snapshot it as a template (``stop`` + ``migrate file:DIR``) and time that;
3. warm-start N clones from the template, one after another, and time each from process
   start to the guest running again (its next heartbeat, which continues the count) —
   first each as its own Python process, then forked from a warm ``stratovirt-pool``;
4. print the figures side by side.

``python -m stratovirt_py.demo [--clones N] [--mem MiB] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional

HEARTBEAT = re.compile(rb"heartbeat (\d+)\n")


class Vm:
    def __init__(self, args: List[str], qmp_path: str, env: Optional[dict] = None):
        self.qmp_path = qmp_path
        exe = os.path.join(os.path.dirname(sys.executable), "stratovirt")
        cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "stratovirt_py"]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd + args + ["-qmp", f"unix:{qmp_path},server,nowait",
                                                   "-serial", "stdio"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.out = b""
        self.marks = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            now = time.perf_counter()
            with self._cond:
                self.out += chunk
                if b"SVGUEST" in self.out and "banner" not in self.marks:
                    self.marks["banner"] = now
                if HEARTBEAT.search(self.out) and "heartbeat" not in self.marks:
                    self.marks["heartbeat"] = now
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_mark(self, name: str, timeout: float = 60) -> float:
        with self._cond:
            self._cond.wait_for(lambda: name in self.marks or self.proc.poll() is not None, timeout)
            if name not in self.marks:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                raise RuntimeError(f"guest never printed its {name} (rc={self.proc.poll()}) {err}")
            return (self.marks[name] - self.t0) * 1000

    def heartbeats(self) -> List[int]:
        with self._cond:
            return [int(m) for m in HEARTBEAT.findall(self.out)]

    def qmp(self, *cmds) -> List[dict]:
        s = socket.socket(socket.AF_UNIX)
        for _ in range(500):
            try:
                s.connect(self.qmp_path)
                break
            except OSError:
                time.sleep(0.01)
        f = s.makefile("rwb")
        f.readline()
        replies = []
        for name, args in (("qmp_capabilities", None),) + cmds:
            msg = {"execute": name}
            if args:
                msg["arguments"] = args
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            while True:
                r = json.loads(f.readline())
                if "event" not in r:
                    break
            replies.append(r)
        s.close()
        return replies[1:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clones", type=int, default=5)
    ap.add_argument("--mem", type=int, default=256, help="guest memory in MiB")
    ap.add_argument("--dir", help="where to put the template (default: a temporary directory)")
    ap.add_argument("--initwork", type=int, default=500,
                    help="ms of busy start-up work the guest does before its first heartbeat, "
                         "standing in for kernel and application start-up (0: none)")
    opts = ap.parse_args(argv)

    from .guest.build import build_guest
    kernel = str(build_guest("elf"))
    work = opts.dir or tempfile.mkdtemp(prefix="stratovirt-demo-")
    os.makedirs(work, exist_ok=True)
    template = os.path.join(work, "template")
    common = ["-machine", "microvm", "-m", str(opts.mem), "-kernel", kernel,
              "-append", f"console=ttyS0 sv.hb=5 sv.initwork={opts.initwork}"]
    print(f"demo guest: {kernel}\ntemplate:   {template}")
    print(f"the guest does {opts.initwork} ms of start-up work before its first heartbeat, "
          "standing in for kernel and application start-up; clones restored from the "
          "template skip it\n")

    vm = Vm(common, os.path.join(work, "boot.sock"))
    try:
        banner = vm.wait_mark("banner")
        first_hb = vm.wait_mark("heartbeat")
        while len(vm.heartbeats()) < 5:
            time.sleep(0.01)
        t = time.perf_counter()
        stop, mig = vm.qmp(("stop", None), ("migrate", {"uri": f"file:{template}"}))
        while True:
            st = vm.qmp(("query-migrate", None))[0]["return"].get("status")
            if st not in ("setup", "active"):
                break
            time.sleep(0.002)
        snap_ms = (time.perf_counter() - t) * 1000
        at_snapshot = max(vm.heartbeats())
        vm.qmp(("quit", None))
        vm.proc.wait(10)
    finally:
        vm.kill()
    if st != "completed":
        print(f"snapshot failed: {st}", file=sys.stderr)
        return 1
    print(f"cold boot:  {banner:7.1f} ms to the banner, {first_hb:7.1f} ms to the first heartbeat")
    print(f"snapshot:   {snap_ms:7.1f} ms (stop + migrate until query-migrate says completed), "
          f"guest at heartbeat {at_snapshot}")

    results = {}
    pool_sock = os.path.join(work, "pool.sock")
    pool = subprocess.Popen([sys.executable, "-m", "stratovirt_py.pool", "--socket", pool_sock],
                            stdout=subprocess.PIPE, text=True)
    try:
        pool.stdout.readline()
        # "process": never a pool, not even one on the default socket
        for mode, env in (("process", dict(os.environ, STRATOVIRT_POOL="off")),
                          ("pool", dict(os.environ, STRATOVIRT_POOL=pool_sock))):
            times = []
            for i in range(opts.clones):
                c = Vm(common + ["-incoming", f"file:{template}"],
                       os.path.join(work, f"{mode}{i}.sock"), env)
                try:
                    ms = c.wait_mark("heartbeat")
                    first = c.heartbeats()[0]
                finally:
                    c.kill()
                times.append(ms)
                print(f"clone {i} ({mode}): {ms:7.1f} ms to the guest's next heartbeat ({first}, "
                      f"continuing from {at_snapshot})")
            results[mode] = statistics.median(times)
    finally:
        pool.terminate()
        pool.wait()
    print(f"\nwarm start, median of {opts.clones} clones: {results['process']:.1f} ms as a new "
          f"process, {results['pool']:.1f} ms from stratovirt-pool")
    print(f"cold boot to the first heartbeat:            {first_hb:.1f} ms")
    if not opts.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"demo: {e}", file=sys.stderr)
        sys.exit(1)
