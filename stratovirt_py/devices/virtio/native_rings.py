"""Point a C fast path's ring view (``struct blk_dp`` / ``struct net_dp``) at a queue.

The C side gets guest RAM and the rings by address: no buffer is exported, so closing
guest memory never finds it pinned.  Loaded with the fast paths, at the first kick.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any
    from .queue import Queue

MAX_REGIONS = 2


def load_compiled(name: str) -> "tuple":
    """(ffi, lib) of a fast path built at install time, or (None, None) without a compiler."""
    import importlib
    try:
        mod = importlib.import_module(f".{name}", __package__)
    except ImportError:
        return None, None
    return mod.ffi, mod.lib


def ring_key(q: "Queue") -> tuple:
    """What a bound view depends on: rebind when it changes (reset, new rings, new RAM)."""
    return (id(q.mem), q.desc_table, q.avail_ring, q.used_ring, q.size)


def bind_rings(dp: "Any", ffi: "Any", q: "Queue") -> bool:
    """Fill the RAM and ring fields of ``dp``; False if the RAM layout is too complex."""
    mem = q.mem
    if len(mem.regions) > MAX_REGIONS:
        return False
    for i, region in enumerate(mem.regions):
        dp.gpa[i], dp.size[i] = region.gpa, region.size
        dp.host[i] = ffi.cast("uint8_t *", region.host_addr)
    dp.nregions = len(mem.regions)

    def host(gpa: int, length: int) -> "Any":   # validate() checked the rings are in RAM
        return ffi.cast("uint8_t *", mem.host_address(gpa, length))
    dp.desc = host(q.desc_table, 16 * q.size)
    dp.avail = host(q.avail_ring, 6 + 2 * q.size)
    dp.used = host(q.used_ring, 6 + 8 * q.size)
    dp.qsize = q.size
    return True
