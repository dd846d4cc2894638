"""Test helpers: run the real ``stratovirt`` process and talk to it.

``VmProcess`` starts the VMM with ``-serial stdio`` captured through a pipe (or a
serial file), collects the guest's serial output on a thread and waits for lines;
``QmpClient`` is a minimal line-based QMP client for assertions on raw replies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
KVM_REQUIRED = os.environ.get("STRATOVIRT_REQUIRE_KVM") == "1"


def stratovirt_cmd() -> List[str]:
    exe = shutil.which("stratovirt", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "stratovirt_py"]


def require_kvm() -> None:
    """Skip (or fail, where CI demands KVM) when /dev/kvm is not usable."""
    reason = None
    if not os.path.exists("/dev/kvm"):
        reason = "/dev/kvm does not exist"
    elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason = "/dev/kvm is not accessible"
    if reason:
        if KVM_REQUIRED:
            pytest.fail(f"STRATOVIRT_REQUIRE_KVM=1 but {reason}")
        pytest.skip(reason)


class QmpClient:
    def __init__(self, path: str, timeout: float = 10.0, negotiate: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""
        self.events: List[Dict[str, Any]] = []
        self.greeting = self._recv()
        if negotiate:
            assert self.cmd("qmp_capabilities") == {"return": {}}

    def _recv(self) -> Dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, name: str, **arguments: Any) -> Dict[str, Any]:
        msg: Dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return self.reply()

    def reply(self) -> Dict[str, Any]:
        while True:
            msg = self._recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def wait_event(self, name: str, timeout: float = 10.0) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {name} event")
            self.sock.settimeout(remaining)
            msg = self._recv()
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()


class VmProcess:
    """One ``stratovirt`` process with its serial output collected."""

    def __init__(self, args: List[str], tmp: Path, qmp: bool = True, serial: bool = True,
                 env: Optional[Dict[str, str]] = None, prefix: Optional[List[str]] = None,
                 pass_fds: tuple = ()):
        """``prefix`` runs the VMM under another command (``ip netns exec NS``);
        ``pass_fds`` hands it file descriptors (a tap, as an orchestrator would)."""
        self.tmp = tmp
        self.qmp_path = str(tmp / f"qmp-{os.getpid()}-{id(self)}.sock")
        argv = list(prefix or []) + stratovirt_cmd() + list(args)
        if qmp:
            argv += ["-qmp", f"unix:{self.qmp_path},server,nowait"]
        if serial:
            argv += ["-serial", "stdio"]
        self.argv = argv
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, pass_fds=tuple(pass_fds))
        self._out = bytearray()
        self._err = bytearray()
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream, buf: bytearray) -> None:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            with self._cond:
                buf += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._cond:
            return self._err.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> "re.Match[str]":
        """Wait until the serial output (from character ``start``) matches ``pattern``."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._out.decode(errors="replace")
                # Only complete lines count: "heartbeat 1$" must not match half of "heartbeat 12".
                m = rx.search(text[:text.rfind("\n") + 1], start)
                if m:
                    return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AssertionError(
                        f"pattern {pattern!r} not seen (rc={self.proc.poll()})\n"
                        f"--- serial ---\n{text[-3000:]}\n--- stderr ---\n{self._err.decode(errors='replace')[-3000:]}")
                self._cond.wait(min(remaining, 0.2))

    def qmp(self, timeout: float = 10.0) -> QmpClient:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return QmpClient(self.qmp_path)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"QMP socket never came up (rc={self.proc.poll()})\n{self.stderr}")
                time.sleep(0.02)

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "VmProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()


def run_cli(args: List[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(stratovirt_cmd() + list(args), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


class PoolProcess:
    """A ``stratovirt-pool`` on its own socket; ``env`` makes ``stratovirt`` use it."""

    def __init__(self, path: str, *extra: str):
        self.path = path
        exe = os.path.join(os.path.dirname(sys.executable), "stratovirt-pool")
        self.proc = subprocess.Popen([exe, "--socket", path, *extra], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == "stratovirt-pool: ready", f"the pool did not start: {line!r}"
        self.env = dict(os.environ, STRATOVIRT_POOL=path)

    def stop(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
