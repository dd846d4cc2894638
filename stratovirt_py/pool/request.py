"""The request a ``stratovirt`` front end sends to the pool, as the pool reads it.

The front end (``stratovirt_py/frontend/stratovirt.c``) writes, in native byte
order: ``SVPOOL1\\n``, the payload length (u32) and the number of descriptors
(u32), then the payload as records of u32 tag, u32 length and bytes.  The
descriptors come as SCM_RIGHTS with the first bytes.  Replies are 8 bytes each:
``PID\\0`` + u32 pid once the VM process has the request, ``EXIT`` + i32 status
when the VM ends.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from typing import Dict, List, Optional, Tuple

from ..errors import VmmError

MAGIC = b"SVPOOL1\n"
HEADER = struct.Struct("=8sII")
RECORD = struct.Struct("=II")
MAX_PAYLOAD = 4 << 20           # a command line and environment, with room to spare
MAX_FDS = 253                   # the kernel's SCM_MAX_FD

T_ARG, T_ENV, T_FD, T_CWD, T_ROOT, T_NS, T_UMASK, T_RLIMIT, T_GROUPS, T_AFFINITY, T_NICE = range(1, 12)


class RequestError(VmmError):
    pass


class Request:
    """What the launcher is: its command line, environment, descriptors and identity."""

    def __init__(self) -> None:
        self.argv: List[str] = []
        self.env: Dict[str, str] = {}
        self.fds: List[Tuple[int, int]] = []       # (received fd, number in the launcher)
        self.namespaces: List[Tuple[str, int]] = []  # (kind, received fd)
        self.root: Optional[int] = None
        self.cwd: Optional[int] = None
        self.umask: Optional[int] = None
        self.rlimits: List[Tuple[int, int, int]] = []
        self.groups: Optional[List[int]] = None
        self.affinity: Optional[set] = None
        self.nice: Optional[int] = None
        self.pid = 0                 # the launcher, from SO_PEERCRED
        self.uid = 0
        self.gid = 0
        self.received: List[int] = []   # every descriptor that came with the request

    def close_unused(self) -> None:
        used = {fd for fd, _ in self.fds}
        for fd in self.received:
            if fd not in used:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _u32(data: bytes) -> int:
    if len(data) < 4:
        raise RequestError("truncated record")
    return struct.unpack_from("=I", data)[0]


def _limit(value: int) -> int:
    import resource
    return resource.RLIM_INFINITY if value == (1 << 64) - 1 else value


def _fd(received: List[int], index: int) -> int:
    if index >= len(received):
        raise RequestError("a record names a descriptor that did not come")
    return received[index]


def parse(payload: bytes, received: List[int]) -> Request:
    req = Request()
    req.received = received
    off = 0
    while off < len(payload):
        if off + RECORD.size > len(payload):
            raise RequestError("truncated record header")
        tag, length = RECORD.unpack_from(payload, off)
        off += RECORD.size
        data = payload[off:off + length]
        if len(data) != length:
            raise RequestError("truncated record")
        off += length
        if tag == T_ARG:
            req.argv.append(data.decode("utf-8", "surrogateescape"))
        elif tag == T_ENV:
            key, sep, value = data.decode("utf-8", "surrogateescape").partition("=")
            if sep:
                req.env[key] = value
        elif tag == T_FD:
            if length != 8:
                raise RequestError("bad descriptor record")
            index, target = struct.unpack("=II", data)
            req.fds.append((_fd(received, index), target))
        elif tag == T_NS:
            req.namespaces.append((data[4:].decode(), _fd(received, _u32(data))))
        elif tag == T_ROOT:
            req.root = _fd(received, _u32(data))
        elif tag == T_CWD:
            req.cwd = _fd(received, _u32(data))
        elif tag == T_UMASK:
            req.umask = _u32(data) & 0o777
        elif tag == T_RLIMIT and length == 24:
            res, cur, hard = struct.unpack("=QQQ", data)
            req.rlimits.append((res, _limit(cur), _limit(hard)))
        elif tag == T_GROUPS:
            req.groups = list(array.array("I", data[:length - length % 4]))
        elif tag == T_AFFINITY:
            bits = int.from_bytes(data, "little")
            req.affinity = {i for i in range(len(data) * 8) if bits >> i & 1}
        elif tag == T_NICE and length == 4:
            req.nice = struct.unpack("=i", data)[0]
        # unknown tags are skipped: a newer front end may say more
    return req


def receive(conn: socket.socket) -> Request:
    """Read one request (and its descriptors) from a front end's connection."""
    fds: List[int] = []
    data = b""
    need = HEADER.size
    total: Optional[int] = None
    while len(data) < need:
        msg, anc, _flags, _addr = conn.recvmsg(max(65536, need - len(data)),
                                               socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[:len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not msg:
            raise RequestError("the front end closed the connection mid-request")
        data += msg
        if total is None and len(data) >= HEADER.size:
            magic, total, nfds = HEADER.unpack_from(data)
            if magic != MAGIC:
                raise RequestError("not a stratovirt front end")
            if total > MAX_PAYLOAD:
                raise RequestError("request too large")
            need = HEADER.size + total
    req = parse(data[HEADER.size:need], fds)
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    req.pid, req.uid, req.gid = struct.unpack("3i", creds)
    return req


def reply_pid(conn: socket.socket, pid: int) -> None:
    conn.sendall(b"PID\0" + struct.pack("=I", pid))


def reply_exit(conn: socket.socket, code: int) -> None:
    conn.sendall(b"EXIT" + struct.pack("=i", code))
