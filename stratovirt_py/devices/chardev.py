"""Character device backends (``-chardev``): where a console's bytes go and come from.

    backend = create_chardev("socket", "charconsole0", path="/run/x.sock", server=True, nowait=True)
    backend.set_receiver(fn)      # fn(bytes) is called on the I/O thread with guest input
    backend.attach(iothread)      # registers its fds (listener, client, pty master, stdin)
    backend.write(b"...")         # guest output; never blocks
    backend.close()

Kinds: ``file`` (append, no input), ``socket`` (unix socket; as a server it listens and
serves one client at a time, later clients are turned away; as a client it connects),
``pty`` (prints ``char device redirected to /dev/pts/N (label ID)`` on stderr, as QEMU does)
and ``stdio``.

``write`` never blocks and never raises (the legacy serial port calls it on a vCPU
thread, the virtio console on the I/O thread): output to a socket without a client, or to a
client / pty that does not read fast enough, is dropped (and counted in ``dropped``).
"""

from __future__ import annotations

import os
import sys
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    import socket
    from typing import Callable, Optional
    Receiver = Callable[[bytes], None]

from ..logs import get_logger
from ..errors import DeviceError
from .iothread import IoThread

log = get_logger(__name__)

READ_CHUNK = 4096


class CharBackend:
    kind = "null"

    def __init__(self, label: str):
        self.label = label
        self.dropped = 0
        self._receiver: Optional[Receiver] = None
        self._iothread: Optional[IoThread] = None

    def set_receiver(self, fn: Optional[Receiver]) -> None:
        self._receiver = fn

    def attach(self, iothread: IoThread) -> None:
        self._iothread = iothread

    def write(self, data: bytes) -> None:
        self.dropped += len(data)

    def close(self) -> None:
        pass

    def _deliver(self, data: bytes) -> None:
        if data and self._receiver is not None:
            self._receiver(data)

    def _write_nonblocking(self, fd: int, data: bytes) -> bool:
        """Write what the fd takes now; drop the rest. False when the peer is gone."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                self.dropped += len(view)
                return True
            except OSError:  # EPIPE, ECONNRESET, EIO (pty), EBADF (closed meanwhile)
                self.dropped += len(view)
                return False
            view = view[n:]
        return True


class FileBackend(CharBackend):
    kind = "file"

    def __init__(self, label: str, path: str):
        super().__init__(label)
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DeviceError(f"chardev {label}: cannot open {path}: {e.strerror}") from None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            self.dropped += len(view)
            log.warning("chardev %s: writing %s failed: %s", self.label, self.path, e.strerror)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SocketBackend(CharBackend):
    kind = "socket"

    def __init__(self, label: str, path: str, server: bool = True, nowait: bool = True):
        super().__init__(label)
        self.path = path
        self.server = server
        self.listener: Optional[socket.socket] = None
        self.client: Optional[socket.socket] = None
        self._lock = threading.Lock()   # client changes (I/O thread) vs. writes (any thread)
        self._accept_lock = threading.Lock()
        import socket           # only socket chardevs pay for it
        try:
            if server:
                if os.path.exists(path):
                    os.unlink(path)
                self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.listener.bind(path)
                self.listener.listen(1)
                if not nowait:
                    print(f"stratovirt: waiting for a connection on {path} (chardev {label})",
                          file=sys.stderr)
                    conn, _ = self.listener.accept()
                    self._set_client(conn)
                self.listener.setblocking(False)
            else:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.connect(path)
                self._set_client(conn)
        except OSError as e:
            self.close()
            raise DeviceError(f"chardev {label}: cannot {'listen on' if server else 'connect to'} "
                              f"{path}: {e.strerror or e}") from None

    def _set_client(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with self._lock:
            self.client = conn
        if self._iothread is not None:
            self._iothread.register(conn.fileno(), self._on_client_readable)

    def attach(self, iothread: IoThread) -> None:
        super().attach(iothread)
        if self.listener is not None:
            iothread.register(self.listener.fileno(), self._on_accept)
        if self.client is not None:
            iothread.register(self.client.fileno(), self._on_client_readable)

    def _on_accept(self) -> None:
        # The I/O thread and a writer (see write) may both try: one of them takes the
        # connection and sets it as the client before the other looks.
        with self._accept_lock:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            if self.client is not None:
                log.info("chardev %s: a client is already connected; refusing another", self.label)
                conn.close()
                return
            self._set_client(conn)

    def _on_client_readable(self) -> None:
        conn = self.client
        if conn is None:
            return
        try:
            data = conn.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()
            return
        self._deliver(data)

    def _drop_client(self) -> None:
        with self._lock:
            conn, self.client = self.client, None
            if conn is None:
                return
            if self._iothread is not None:
                self._iothread.unregister(conn.fileno())
            conn.close()

    def write(self, data: bytes) -> None:
        if self.client is None and self.listener is not None:
            # A client waiting in the backlog (the I/O thread has not accepted it
            # yet) already asked for this output.
            self._on_accept()
        with self._lock:
            conn = self.client
            if conn is None:
                self.dropped += len(data)
                return
            ok = self._write_nonblocking(conn.fileno(), data)
        if not ok:
            self._drop_client()

    def close(self) -> None:
        self._drop_client()
        if self.listener is not None:
            if self._iothread is not None:
                self._iothread.unregister(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


class PtyBackend(CharBackend):
    kind = "pty"

    def __init__(self, label: str):
        super().__init__(label)
        self.master, self._slave = os.openpty()
        import tty
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        # Keeping the slave open means the master never sees a hang-up when a client
        # (screen, minicom) detaches; output then fills the pty buffer and is dropped.
        self.path = os.ttyname(self._slave)
        print(f"char device redirected to {self.path} (label {label})", file=sys.stderr)

    def attach(self, iothread: IoThread) -> None:
        super().attach(iothread)
        iothread.register(self.master, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.master, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        self._deliver(data)

    def write(self, data: bytes) -> None:
        self._write_nonblocking(self.master, data)

    def close(self) -> None:
        if self.master >= 0:
            if self._iothread is not None:
                self._iothread.unregister(self.master)
            os.close(self.master)
            os.close(self._slave)
            self.master = -1


class StdioBackend(CharBackend):
    """stdin/stdout; a terminal on stdin is put in raw-ish mode (no echo, no line editing;
    Ctrl-C still interrupts the VMM) and restored at exit."""

    kind = "stdio"

    def __init__(self, label: str, in_fd: int = 0, out_fd: int = 1):
        super().__init__(label)
        self.in_fd, self.out_fd = in_fd, out_fd
        self._saved_tty = None
        if os.isatty(in_fd):
            import atexit
            import termios
            self._saved_tty = termios.tcgetattr(in_fd)
            mode = termios.tcgetattr(in_fd)
            mode[0] &= ~(termios.ICRNL | termios.IXON)               # iflag
            mode[3] &= ~(termios.ICANON | termios.ECHO | termios.IEXTEN)  # lflag
            mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
            termios.tcsetattr(in_fd, termios.TCSANOW, mode)
            atexit.register(self._restore_tty)

    def attach(self, iothread: IoThread) -> None:
        super().attach(iothread)
        try:
            iothread.register(self.in_fd, self._on_readable)
        except PermissionError:  # a regular file or /dev/null cannot be polled: no input
            pass

    def _on_readable(self) -> None:
        try:
            data = os.read(self.in_fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # EOF: stop watching stdin
            if self._iothread is not None:
                self._iothread.unregister(self.in_fd)
            return
        self._deliver(data)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.out_fd, view):]
        except OSError:
            self.dropped += len(view)

    def _restore_tty(self) -> None:
        if self._saved_tty is not None:
            try:
                import termios
                termios.tcsetattr(self.in_fd, termios.TCSANOW, self._saved_tty)
            except termios.error:
                pass
            self._saved_tty = None

    def close(self) -> None:
        if self._iothread is not None:
            self._iothread.unregister(self.in_fd)
        self._restore_tty()


def create_chardev(kind: str, label: str, path: Optional[str] = None,
                   server: bool = False, nowait: bool = False) -> CharBackend:
    """A backend from parsed ``-chardev KIND,id=LABEL,path=P[,server][,nowait]``."""
    if kind == "file":
        if not path:
            raise DeviceError(f"chardev {label}: file needs path=")
        return FileBackend(label, path)
    if kind == "socket":
        if not path:
            raise DeviceError(f"chardev {label}: socket needs path=")
        return SocketBackend(label, path, server=server, nowait=nowait)
    if kind == "pty":
        return PtyBackend(label)
    if kind == "stdio":
        return StdioBackend(label)
    raise DeviceError(f"chardev {label}: unsupported backend {kind!r} "
                      f"(use file, socket, pty or stdio)")


def backend_for(vmm, chardev_id: str) -> CharBackend:
    """The backend of ``-chardev id=...``, opened once per VM and closed with it."""
    backends = vmm.chardev_backends
    if chardev_id not in backends:
        ch = vmm.cfg.chardevs[chardev_id]
        backends[chardev_id] = create_chardev(ch.backend, ch.id, ch.path, server=ch.server,
                                              nowait=ch.nowait)
        vmm.cleanups.append(backends[chardev_id].close)
    return backends[chardev_id]
