"""The ``stratovirt`` entry point: run the VM here, or hand it to a warm pool.

When ``STRATOVIRT_POOL`` names the socket of a running ``stratovirt-pool``, this
process stays a thin stand-in for the VM: it passes its command line, working
directory, environment and file descriptors (stdio and any inherited fds such as
taps) to the pool, which forks a VM process from its already-imported interpreter.
Signals sent to this process are forwarded to the VM, and the VM ends when this
process does (even by SIGKILL, as Kata stops StratoVirt), so it behaves like the VM
process itself.  Without a pool (or with ``-daemonize``, ``-help``, ``-version``)
the VM runs in this process.  Only the standard library's smallest modules are
imported here: this is on every warm start's critical path.
"""

import array
import json
import os
import signal
import socket
import sys

MAX_FDS = 64


def _inherited_fds():
    fds = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = [str(i) for i in range(3)]
    for name in names:
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue        # the directory listing's own fd
        fds.append(fd)
    return sorted(fds)[:MAX_FDS]


def _via_pool(path, argv):
    """Run the VM in a pool child; returns its exit status, or None to run it here."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    fds = [fd for fd in _inherited_fds() if fd != sock.fileno()]
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "fds": fds}
    data = json.dumps(request).encode() + b"\n"
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    reader = sock.makefile("rb")
    line = reader.readline()
    if not line:
        return None         # the pool went away before forking: run here
    child = json.loads(line).get("pid")

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    line = reader.readline()
    if not line:
        return 1            # the VM died without a word (killed)
    return int(json.loads(line).get("exit", 1))


def main():
    argv = sys.argv[1:]
    pool = os.environ.get("STRATOVIRT_POOL")
    if pool and not {"-daemonize", "--daemonize", "-h", "-help", "-version"} & set(argv):
        code = _via_pool(pool, argv)
        if code is not None:
            os._exit(code)
    from .cli import main as run_here
    run_here(argv)
