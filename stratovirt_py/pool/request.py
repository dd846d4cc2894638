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
import socket
import struct
from typing import Dict, List, Optional, Tuple

from ..errors import VmmError

MAGIC = b"SVPOOL1\n"
HEADER = struct.Struct("=8sII")
RECORD = struct.Struct("=II")
MAX_PAYLOAD = 4 << 20           # a command line and environment, with room to spare
MAX_FDS = 253                   # the kernel's SCM_MAX_FD

T_ARG, T_ENV, T_FD = 1, 2, 3


class RequestError(VmmError):
    pass


class Request:
    """What the launcher asks for: its command line, environment and descriptors.

    Who the launcher is (its pid, uid and gid) comes from the kernel (SO_PEERCRED),
    and everything else about it is read from /proc/PID by ``identity``: nothing in
    the request can claim a group, a limit or a namespace the launcher does not have.
    """

    def __init__(self) -> None:
        self.argv: List[str] = []
        self.env: Dict[str, str] = {}
        self.fds: List[Tuple[int, int]] = []       # (received fd, number in the launcher)
        self.pid = 0                 # the launcher, from SO_PEERCRED
        self.uid = 0
        self.gid = 0
        self.received: List[int] = []   # every descriptor that came with the request


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
