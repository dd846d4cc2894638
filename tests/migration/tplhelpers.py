"""Helpers shared by the template-format tests (a unique name: tests/*/ have no __init__.py)."""

import hashlib
import json
import os
import random

from stratovirt_py.memory import GuestMemory
from stratovirt_py.migration import format as fmt

MiB = 1 << 20


def fill(mem: GuestMemory, seed: int) -> None:
    """Touch a few scattered pages, a dense 3 MiB run and the last byte of RAM."""
    size = mem.size
    rnd = random.Random(seed)
    for _ in range(40):
        page = rnd.randrange(0, size // 4096)
        mem.write(page * 4096 + rnd.randrange(0, 4096 - 16), rnd.randbytes(16))
    start = 5 * MiB + 4096 * 3
    mem.write(start, rnd.randbytes(3 * MiB))
    last = mem.regions[-1]
    mem.write(last.gpa + last.size - 1, b"\xee")


def memory_bytes(mem: GuestMemory) -> bytes:
    return b"".join(bytes(r.mm) for r in mem.regions)


def rewrite_state(d, mutate_header=None, version=None, mutate=None):
    """Rewrite the state like a (newer) writer would: new fields, valid checksum.
    ``mutate(header, data)`` may also change the data area (a bytearray)."""
    path = os.path.realpath(d / "state")
    blob = open(path, "rb").read()
    magic, ver, hlen, total, res = fmt.PREAMBLE.unpack_from(blob)
    header = json.loads(blob[fmt.PREAMBLE.size:fmt.PREAMBLE.size + hlen])
    data = bytearray(blob[fmt.PREAMBLE.size + hlen:total - 32])
    if mutate_header:
        mutate_header(header)
    if mutate:
        mutate(header, data)
    hj = json.dumps(header).encode()
    new_total = fmt.PREAMBLE.size + len(hj) + len(data) + 32
    out = fmt.PREAMBLE.pack(magic, version or ver, len(hj), new_total, res) + hj + bytes(data)
    out += hashlib.sha256(out).digest()
    with open(path, "wb") as f:
        f.write(out)
