"""The QMP listening sockets, bound before the VM is built.

A client (Kata retries every 50 ms) may connect while a restore is still under way:
its connection waits in the socket's backlog and is served as soon as the QMP thread
runs, instead of being refused because the socket does not exist yet.  Binding uses
``_socket`` directly: ``socket.py`` wraps it with enums, an import the restore path
does without.  The QMP server wraps the descriptors in ``socket.socket`` later.
"""

from __future__ import annotations

import os
import stat

import _socket

from ..errors import ConfigError
from .address import QmpAddress

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import List, Optional, Sequence

BACKLOG = 16


class Listener:
    """One bound, listening socket: its descriptor, its address, and (unix) the inode we made."""

    __slots__ = ("fd", "address", "ino")

    def __init__(self, fd: int, address: QmpAddress, ino: Optional[int]):
        self.fd = fd
        self.address = address
        self.ino = ino

    def close(self) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        if self.address.kind == "unix":
            # Only remove the file if it is still the socket we created.
            try:
                if os.stat(self.address.path).st_ino == self.ino:
                    os.unlink(self.address.path)
            except OSError:
                pass


def _bind_tcp(address: QmpAddress) -> Listener:
    family = _socket.AF_INET6 if ":" in address.host else _socket.AF_INET
    sock = _socket.socket(family, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen for QMP on {address}: {err.strerror or err}") from err
    return Listener(sock.detach(), address, None)


def _bind_unix(address: QmpAddress) -> Listener:
    path = address.path
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise ConfigError(f"cannot use QMP socket path {path}: {err.strerror}") from err
    if mode is not None:
        # A socket left by a previous run is replaced; anything else is the
        # user's file and is not ours to delete.
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"QMP socket path {path} exists and is not a socket")
        os.unlink(path)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # as StratoVirt: the monitor is the owner's only
        sock.listen(BACKLOG)
        ino = os.stat(path).st_ino
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen for QMP on {address}: {err.strerror or err}") from err
    return Listener(sock.detach(), address, ino)


def bind(address: QmpAddress) -> Listener:
    return _bind_unix(address) if address.kind == "unix" else _bind_tcp(address)


def bind_all(addresses: Sequence[QmpAddress]) -> List[Listener]:
    """Listen on every address, or on none (a ConfigError names the one that failed)."""
    done: List[Listener] = []
    try:
        for address in addresses:
            done.append(bind(address))
    except BaseException:
        for listener in done:
            listener.close()
        raise
    return done
