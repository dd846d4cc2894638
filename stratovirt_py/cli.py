"""The ``stratovirt`` command: the CLI edge where errors become one line and exit 1."""

from __future__ import annotations

import _signal as signal    # the signal module's enums cost an import on the restore path
import os
import sys

from . import logs
from .errors import VmmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, List, Optional

log = logs.get_logger("stratovirt")


def _setup_logging(cfg) -> None:
    """Decide where records go now (a bad -D file is a start-up error); install it later."""
    stream = None
    if cfg.log_file:
        try:
            stream = open(cfg.log_file, "a", buffering=1)
        except OSError as e:
            raise VmmError(f"-D: cannot open log file {cfg.log_file}: {e.strerror}") from None
    logs.configure(cfg.log_enabled, stream)


def _daemonize() -> int:
    """Fork into the background; the parent waits for the child's word and exits with it.

    Returns the write end of the readiness pipe in the daemon.
    """
    rfd, wfd = os.pipe()
    if os.fork() > 0:
        os.close(wfd)
        msg = b""
        while True:
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            msg += chunk
        if msg.startswith(b"OK"):
            os._exit(0)
        sys.stderr.write(msg.decode(errors="replace") or "stratovirt: the daemon exited during start-up\n")
        os._exit(1)
    os.close(rfd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    return wfd


def run(argv: List[str], on_started: Optional[Callable] = None) -> int:
    from .cmdline import USAGE, VERSION_TEXT, parse_args
    cfg, show = parse_args(argv)
    if show == "help":
        sys.stdout.write(USAGE)
        return 0
    if show == "version":
        print(VERSION_TEXT)
        return 0
    _setup_logging(cfg)
    ready_fd: Optional[int] = None
    if cfg.daemonize:
        ready_fd = _daemonize()
    try:
        code = _run_vm(cfg, ready_fd, on_started)
    except VmmError as e:
        if ready_fd is not None:
            os.write(ready_fd, f"stratovirt: {e}\n".encode())
        raise
    return code


def _drop_privileges(vmm) -> None:
    """Give up capabilities on every thread, also with -disable-seccomp (docs/security.md)."""
    from . import privs
    try:
        ms = privs.drop()
    except OSError as e:
        vmm.shutdown()
        raise VmmError(f"cannot drop capabilities: {e.strerror}") from None
    log.info("capabilities dropped and no_new_privs set on every thread in %.2f ms", ms)


def _install_seccomp(cfg, vmm) -> None:
    """Filter every thread now that the guest and QMP run (docs/security.md, "Seccomp")."""
    if cfg.disable_seccomp:
        log.info("seccomp: filters off (-disable-seccomp)")
        return
    from . import seccomp
    try:
        ms = seccomp.install()
    except OSError as e:
        vmm.shutdown()
        raise VmmError(f"cannot install seccomp filters: {e.strerror} (-disable-seccomp runs without)") from None
    log.info("seccomp: filters on for all threads (%d rules, other syscalls fail with EPERM) in %.2f ms",
             len(seccomp.rules()), ms)


def _run_vm(cfg, ready_fd: Optional[int], on_started: Optional[Callable] = None) -> int:
    from . import pinning
    pinning.choose()
    # Listening first: a client that connects during the restore waits, and is served.
    from .qmp.address import parse_qmp_address
    from .qmp.listen import bind_all
    listeners = bind_all([parse_qmp_address(a) for a in cfg.qmp])
    from .qmp.events import EventBus
    from .vcpu_thread import install_kick_handler
    install_kick_handler()
    events = EventBus()
    try:
        if cfg.incoming is not None:
            from .migration.restore import restore_vmm
            vmm = restore_vmm(cfg, events)
        else:
            from .builder import boot_vmm
            vmm = boot_vmm(cfg, events)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    if cfg.pidfile:
        try:
            with open(cfg.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as e:
            raise VmmError(f"-pidfile: cannot write {cfg.pidfile}: {e.strerror}") from None
        vmm.cleanups.append(lambda: os.path.exists(cfg.pidfile) and os.unlink(cfg.pidfile))

    def on_signal(signum, frame) -> None:
        import signal as named
        vmm.request_exit("host-signal", 0, f"received signal {named.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    # The guest runs first and QMP (listening since before the build) is served right
    # after: a warm start does not wait for the management plane.
    vmm.start(paused=cfg.start_paused)
    logs.start()
    # Before QMP serves (a command must never run with capabilities; its thread then
    # starts without them) and before the filter, which allows neither capset nor prctl.
    _drop_privileges(vmm)
    from .qmp.server import QmpServer
    server = QmpServer(vmm, events, cfg.qmp, listeners)
    try:
        server.start()
    except VmmError:
        vmm.shutdown()
        raise
    vmm.cleanups.append(server.close)
    _install_seccomp(cfg, vmm)
    stamp = getattr(vmm.restored_from, "pending_stamp", None)
    if stamp is not None:       # verification bookkeeping, once the guest and QMP run
        stamp()
    log.info("VM %s started (%d vCPUs, %d MiB)", cfg.name or "", cfg.nr_cpus, cfg.mem_size >> 20)
    if on_started is not None:
        on_started(vmm)
    if ready_fd is not None:
        os.write(ready_fd, b"OK")
        os.close(ready_fd)
        os.dup2(os.open(os.devnull, os.O_RDWR), 2)
    code = vmm.wait()
    vmm.shutdown()
    if vmm.exit_message and code:
        sys.stderr.write(f"stratovirt: {vmm.exit_message}\n")
    return code


def main(argv: Optional[List[str]] = None, on_started: Optional[Callable] = None,
         exit: bool = True) -> int:
    """Run the VM; exit the process with its status (or return it, for the pool)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        code = run(args, on_started)
    except VmmError as e:
        sys.stderr.write(f"stratovirt: {e}\n")
        code = 1
    except KeyboardInterrupt:
        code = 1
    except Exception as e:  # a bug: still one line for the user, the trace in the log
        log.debug("internal error", exc_info=True)
        sys.stderr.write(f"stratovirt: internal error: {type(e).__name__}: {e}\n")
        code = 1
    logs.start()
    sys.stdout.flush()
    sys.stderr.flush()
    if not exit:
        return code
    # vCPU threads may sit in KVM_RUN; leave without waiting for them.
    os._exit(code)


if __name__ == "__main__":
    main()
