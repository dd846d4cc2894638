"""``stratovirt-pool``: a warm interpreter that forks VM processes on request.

A Python VMM pays for its interpreter and imports on every start — most of a warm
start's time on a small host.  The pool pays once: it imports the whole VM path,
reads the host's KVM facts, then waits on a unix socket.  ``stratovirt`` (see
``launcher``) connects with its command line and file descriptors; the pool forks
a child that becomes the VM, exactly as if ``stratovirt`` had run it itself, and
tells the launcher the child's pid and, at the end, its exit status.  The pool
never creates a VM itself and stays single-threaded, so forking it is safe.

    stratovirt-pool --socket /run/stratovirt-pool.sock &
    STRATOVIRT_POOL=/run/stratovirt-pool.sock stratovirt ... -incoming file:DIR
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import signal
import socket
import sys
import threading
from typing import List, Optional, Tuple

MAX_FDS = 64
MAX_REQUEST = 1 << 20


def _warm_up() -> None:
    """Import everything a VM start needs and cache the host's KVM facts."""
    from . import builder, cli, cmdline  # noqa: F401
    from .devices import hotplug, setup  # noqa: F401
    from .devices.virtio import blk, console, mmio, net, rng  # noqa: F401
    from .kvm import system
    from .migration import format, restore, snapshot  # noqa: F401
    from .qmp import commands, events, server  # noqa: F401
    system.warm_host_facts()


def _receive(conn: socket.socket):
    data = b""
    fds: List[int] = []
    while not data.endswith(b"\n"):
        msg, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[:len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not msg:
            break
        data += msg
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    return json.loads(data), fds


def _become_vm(conn: socket.socket, listener: socket.socket, request: dict, fds: List[int]) -> None:
    """In the forked child: take the launcher's identity, run the VM, report, exit."""
    listener.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    targets = request.get("fds") or []
    # Move the received fds out of the way, then onto the numbers they had in the launcher.
    moved = [os.dup(fd) for fd in fds]
    for fd in fds:
        os.close(fd)
    keep = {conn.fileno()}
    for src, dst in zip(moved, targets):
        if dst == conn.fileno():
            new = os.dup(conn.fileno())
            conn = socket.socket(fileno=new)
            keep = {new}
        os.dup2(src, dst, inheritable=dst > 2)
        keep.add(dst)
    for src in moved:
        if src not in keep:
            os.close(src)
    os.chdir(request.get("cwd") or "/")
    os.environ.clear()
    os.environ.update(request.get("env") or {})
    conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")

    def watch_launcher(vmm) -> None:
        # The launcher is the process others see and kill; when it goes, the VM goes.
        def wait() -> None:
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
            vmm.request_exit("host-signal", 0, "the stratovirt launcher went away")
        threading.Thread(target=wait, name="launcher-watch", daemon=True).start()

    from . import cli
    code = cli.main(request.get("argv") or [], on_started=watch_launcher, exit=False)
    try:
        conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
    except OSError:
        pass
    os._exit(code)


def _spare_child(listener: socket.socket) -> Tuple[int, socket.socket]:
    """Fork the next VM process ahead of time; it waits for a connection to serve.

    Forking (and the copy-on-write faults right after it) is off the critical path:
    when a request comes, a process that is already there takes it.
    """
    # SEQPACKET, not DGRAM: the spare must see EOF when the pool goes away.
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid:
        child_end.close()
        return pid, parent_end
    parent_end.close()
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _msg, anc, _flags, _addr = child_end.recvmsg(1, socket.CMSG_SPACE(4))
        conn_fd = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                conn_fd = array.array("i", payload[:4])[0]
        if conn_fd < 0:
            os._exit(0)         # the pool is shutting down
        child_end.close()
        conn = socket.socket(fileno=conn_fd)
        request, fds = _receive(conn)
        _become_vm(conn, listener, request, fds)
    except BaseException as e:  # the launcher then sees EOF and reports a failed start
        sys.stderr.write(f"stratovirt-pool: VM start failed: {e}\n")
    os._exit(1)


def serve(path: str, ready: Optional[str] = None) -> None:
    _warm_up()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)     # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # Objects that exist now are never collected: the children share their pages
    # instead of copying them when the collector would touch them.
    gc.collect()
    gc.freeze()
    spare = _spare_child(listener)
    if ready:
        print(ready, flush=True)
    try:
        while True:
            conn, _ = listener.accept()
            _pid, handoff = spare
            try:
                handoff.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [conn.fileno()]))])
            except OSError as e:
                sys.stderr.write(f"stratovirt-pool: spare VM process lost: {e}\n")
            handoff.close()
            conn.close()
            spare = _spare_child(listener)
    except KeyboardInterrupt:
        pass
    finally:
        spare[1].close()
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="stratovirt-pool", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="unix socket to listen on")
    ap.add_argument("--ready", default="stratovirt-pool: ready",
                    help="line printed once the pool accepts requests")
    opts = ap.parse_args(argv)
    serve(opts.socket, opts.ready)


if __name__ == "__main__":
    main()
