"""virtio-blk: hand the plain reads and writes of a kick to the C fast path.

``blk_dataplane.c`` (built at install time with cffi) runs on the calling thread - the
I/O thread, under the transport's lock - with the GIL released, and takes only
requests of the common shape; it stops at the first chain it does not take, and
``blk_batch.run_batch`` then handles that one and the rest in Python.  So what the
device does for any request is defined once, in Python; the C code is a faster way to
do the same for the plain ones, checked against it by the same tests.

Nothing of its state outlives a call: the ring indices go in and come back out of the
Python ``Queue``, so drain, snapshot, reset and hot-replace see no difference.
``STRATOVIRT_BLK_NATIVE=off`` (or a build without the module) keeps everything in Python.
"""

from __future__ import annotations

import os

from .native_rings import bind_rings, load_compiled, ring_key

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Optional
    from .blk import Blk
    from .queue import Queue

# The compiled module, loaded on the first kick (after the guest runs), not when a
# device is made: a restore does not wait for it.
ffi = lib = None
_loaded = False


def built() -> bool:
    """Whether the C fast path was built (and is now loaded)."""
    global ffi, lib, _loaded
    if not _loaded:
        ffi, lib = load_compiled("_blk_dataplane")
        _loaded = True
    return lib is not None


def available() -> bool:
    return os.environ.get("STRATOVIRT_BLK_NATIVE", "on") != "off" and built()


class NativeRing:
    """The C view of one queue and its device's backend, rebound when the rings move."""

    def __init__(self) -> None:
        self.dp = None
        self._key: Optional[tuple] = None

    def _bind(self, q: Queue) -> bool:
        key = ring_key(q)
        if key == self._key:
            return True
        if not bind_rings(self.dp, ffi, q):
            return False
        self._key = key
        return True

    def run(self, dev: "Blk", q: Queue) -> int:
        """Complete the plain requests at the front of the ring; returns how many."""
        if self.dp is None:
            if not built():
                return 0
            self.dp = ffi.new("struct blk_dp *")
        if dev.fd < 0 or not q.ready or not self._bind(q):
            return 0
        dp = self.dp
        dp.fd = dev.fd
        dp.capacity = dev.capacity * 512
        dp.readonly = 1 if dev.readonly else 0
        dp.indirect = 1 if q.indirect else 0
        dp.align = dev.align if dev.direct else 1
        dp.next_avail, dp.next_used = q.next_avail, q.next_used
        done = lib.blk_dp_run(dp)
        q.next_avail, q.next_used = dp.next_avail, dp.next_used
        return done


def native_ring() -> Optional[NativeRing]:
    """A NativeRing when the fast path is allowed (it does nothing if it was not built)."""
    return NativeRing() if os.environ.get("STRATOVIRT_BLK_NATIVE", "on") != "off" else None
