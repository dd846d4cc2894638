"""``stratovirt-pool``: a warm interpreter that forks VM processes on request.

A Python VMM pays for its interpreter and imports on every start, most of a warm
start's time on a small host.  The pool pays once: it imports the whole VM path,
reads the host's KVM facts, then waits on a unix socket.  The native ``stratovirt``
front end connects with its command line, descriptors and identity; a VM process
forked ahead of time takes the launcher's identity (``identity.adopt``: cgroups,
namespaces, root, cwd, limits, user), tells the launcher its pid, and runs the VM
exactly as ``stratovirt`` would have, reporting the exit status at the end.

    stratovirt-pool [--socket /run/stratovirt/pool.sock] [--config /etc/stratovirt/pool.yaml]

The pool itself never creates a VM and stays single-threaded, so forking it is
safe; VM processes do not depend on it once forked, so a pool that dies or is
restarted leaves running VMs alone.
"""

from __future__ import annotations

import argparse
import array
import gc
import os
import select
import signal
import socket
import sys
import threading
from typing import Dict, List, Optional, Set, Tuple

from ..errors import VmmError
from . import config as pool_config
from . import identity
from .request import Request, RequestError, receive, reply_exit, reply_pid


# Not part of a VM's start: entry points, the demo and its guest builder (and the cffi
# build scripts, any module named *_build).
_NOT_WARMED = (".__main__", "._start", ".demo", ".guest")


def _warm_up() -> None:
    """Import everything a VM may need (every module of the package, and what modules
    load lazily after a direct start) and cache the host's KVM facts: a fork of this
    process then imports nothing, and a module added later cannot be forgotten here."""
    import importlib
    import pkgutil

    import stratovirt_py
    for mod in pkgutil.walk_packages(stratovirt_py.__path__, "stratovirt_py."):
        if not mod.name.endswith("_build") and not any(p in mod.name for p in _NOT_WARMED):
            importlib.import_module(mod.name)
    import json, logging, selectors, signal, socket  # noqa: F401,E401 - lazy after a direct start
    from ..devices.virtio import blk_native, net_native
    from ..kvm import system
    from ..migration import memfile
    from .. import _privs_cffi, seccomp  # noqa: F401 - privs loads it at the drop
    blk_native.built()
    net_native.built()
    seccomp._libseccomp()
    memfile._ctypes()
    system.warm_host_facts()


def _place_fds(conn: socket.socket, req: Request) -> socket.socket:
    """Put the launcher's descriptors on the numbers they had there; returns ``conn`` (maybe moved)."""
    targets = {target for _fd, target in req.fds}
    if conn.fileno() in targets:
        old = conn
        conn = socket.socket(fileno=os.dup(old.fileno()))
        old.detach()        # its number is a target: dup2 below replaces it, nothing closes it
    # dup first, then place: a received fd may sit on another one's target number
    moved = [(os.dup(fd), target) for fd, target in req.fds]
    for fd in req.received:
        if fd not in targets:
            os.close(fd)
    for fd, target in moved:
        os.dup2(fd, target, inheritable=target > 2)
        os.close(fd)
    for fd in (0, 1, 2):
        if fd not in targets:   # closed in the launcher: closed in the VM, not the pool's
            try:
                os.close(fd)
            except OSError:
                pass
    return conn


def _tell_launcher(req: Request, message: str) -> None:
    for fd, target in req.fds:
        if target == 2:
            try:
                os.write(fd, f"stratovirt-pool: {message}\n".encode())
            except OSError:
                pass


def _become_vm(conn: socket.socket, req: Request, mounts: Dict[str, Tuple[str, str]]) -> None:
    """In the forked process: take the launcher's identity, run the VM, report, exit."""
    try:
        identity.adopt(req, mounts)
    except VmmError as e:
        # No pid was sent: the launcher runs the VM itself, where it should be.
        _tell_launcher(req, f"{e}; the VM runs in the launcher instead")
        os._exit(1)
    conn = _place_fds(conn, req)
    # /proc/PID/environ still shows the pool's: rewriting it needs CAP_SYS_RESOURCE
    os.environ.clear()
    os.environ.update(req.env)
    reply_pid(conn, os.getpid())

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

    from .. import cli
    code = cli.main(req.argv, on_started=watch_launcher, exit=False)
    try:
        reply_exit(conn, code)
    except OSError:
        pass
    os._exit(code)


class Pool:
    def __init__(self, cfg: pool_config.PoolConfig):
        self.cfg = cfg
        self.mounts = identity.cgroup_mounts()
        self.listener: Optional[socket.socket] = None
        self.spares: List[Tuple[int, socket.socket]] = []
        self.children: Set[int] = set()     # VM processes (spares included) not yet reaped

    def bind(self) -> None:
        path = self.cfg.socket
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, self.cfg.socket_mode)
        listener.listen(64)
        self.listener = listener

    def _fork_spare(self) -> None:
        """Fork the next VM process ahead of time; it waits for a connection to serve.

        Forking (and the copy-on-write faults right after it) is off the critical path:
        when a request comes, a process that is already there takes it.
        """
        # SEQPACKET, not DGRAM: the spare must see EOF when the pool goes away.
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid:
            child_end.close()
            self.spares.append((pid, parent_end))
            self.children.add(pid)
            return
        try:
            parent_end.close()
            self.listener.close()
            for _pid, other in self.spares:
                other.close()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _msg, anc, _flags, _addr = child_end.recvmsg(1, socket.CMSG_SPACE(4))
            conn_fd = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    conn_fd = array.array("i", payload[:4])[0]
            if conn_fd < 0:
                os._exit(0)         # the pool is shutting down
            child_end.close()
            conn = socket.socket(fileno=conn_fd)
            conn.settimeout(self.cfg.request_timeout)
            try:
                req = receive(conn)
            except (RequestError, OSError) as e:
                sys.stderr.write(f"stratovirt-pool: bad request: {e}\n")
                os._exit(1)
            conn.settimeout(None)
            _become_vm(conn, req, self.mounts)
        except BaseException as e:  # the launcher then sees EOF and runs the VM itself
            sys.stderr.write(f"stratovirt-pool: VM start failed: {e}\n")
        os._exit(1)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.spares = [(p, s) for p, s in self.spares if p != pid]

    def _refill(self) -> None:
        while len(self.spares) < self.cfg.spares and len(self.children) < self.cfg.max_children:
            self._fork_spare()

    def serve_forever(self) -> None:
        self._refill()
        while True:
            ready, _, _ = select.select([self.listener], [], [], 1.0)
            self._reap()
            if not ready:
                self._refill()
                continue
            conn, _ = self.listener.accept()
            if not self.spares:
                conn.close()            # at max_children: the launcher runs the VM itself
                continue
            _pid, handoff = self.spares.pop(0)
            try:
                handoff.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [conn.fileno()]))])
            except OSError as e:
                sys.stderr.write(f"stratovirt-pool: spare VM process lost: {e}\n")
            handoff.close()
            conn.close()
            self._refill()

    def close(self) -> None:
        for _pid, handoff in self.spares:
            handoff.close()
        self.spares.clear()
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.cfg.socket)
            except OSError:
                pass


def serve(cfg: pool_config.PoolConfig, ready: Optional[str] = None) -> None:
    _warm_up()
    pool = Pool(cfg)
    pool.bind()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # Objects that exist now are never collected: the children share their pages
    # instead of copying them when the collector would touch them.
    gc.collect()
    gc.freeze()
    try:
        pool._refill()
        if ready:
            print(ready, flush=True)
        pool.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        pool.close()


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="stratovirt-pool", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", help=f"unix socket to listen on (default {pool_config.DEFAULT_SOCKET})")
    ap.add_argument("--config", help=f"YAML settings (default {pool_config.DEFAULT_CONFIG}, if present)")
    ap.add_argument("--spares", type=int, help="VM processes kept forked ahead of requests")
    ap.add_argument("--ready", default="stratovirt-pool: ready",
                    help="line printed once the pool accepts requests")
    opts = ap.parse_args(argv)
    try:
        cfg = pool_config.load(opts.config)
        flags = {k: v for k, v in (("socket", opts.socket), ("spares", opts.spares)) if v is not None}
        cfg.update(flags, "command line")
        serve(cfg, opts.ready)
    except VmmError as e:
        sys.stderr.write(f"stratovirt-pool: {e}\n")
        sys.exit(1)
    except OSError as e:
        sys.stderr.write(f"stratovirt-pool: {cfg.socket}: {e.strerror}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
