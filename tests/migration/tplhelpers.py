"""Helpers shared by the template-format tests (a unique name: tests/*/ have no __init__.py)."""

import random

from stratovirt_py.memory import GuestMemory

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
