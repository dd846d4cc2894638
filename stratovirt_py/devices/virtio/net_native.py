"""virtio-net: hand the plain frames of a kick to the C fast path.

``net_dataplane.c`` (built at install time with cffi) runs on the calling thread - the
I/O thread, under the transport's lock - with the GIL released, and moves only frames
in chains of the common shape; it stops at the first chain it does not take (or at a
read or write that fails), and ``net_rx`` / ``net_tx`` then handle that one in Python.
So what the device does with any chain is defined once, in Python; the C code is a
faster way to do the same for the plain ones, checked against it by the same tests.

Nothing of its state outlives a call: the ring indices go in and come back out of the
Python ``Queue``, and the tap's fd is read from the device on every call, so drain,
snapshot, reset and hot-replace see no difference.  ``STRATOVIRT_NET_NATIVE=off`` (or a
build without the module) keeps everything in Python.
"""

from __future__ import annotations

import os

from ..tap import VNET_HDR_LEN
from .native_rings import bind_rings, load_compiled, ring_key

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import List, Optional, Tuple
    from .net import Net
    from .queue import Queue

# Why a call stopped (net_dataplane.h; also lib.NET_DP_*, once the module is loaded).
NET_DP_HANDBACK = 1
NET_DP_TAP_EMPTY = 2
NET_DP_OVERFLOW = 3

# The compiled module, loaded with the data path at the first frame (after the guest
# runs), not when a device is made: a restore does not wait for it.
ffi = lib = None
_loaded = False


def built() -> bool:
    """Whether the C fast path was built (and is now loaded)."""
    global ffi, lib, _loaded
    if not _loaded:
        ffi, lib = load_compiled("_net_dataplane")
        _loaded = True
    return lib is not None


class NativeNet:
    """The C views of a device's receive and transmit queues, rebound when rings move."""

    def __init__(self, dev: "Net") -> None:
        self._dps = [ffi.new("struct net_dp *"), ffi.new("struct net_dp *")]
        self._keys: List[Optional[tuple]] = [None, None]
        # The C side reads into the device's own bounce buffer, where the Python
        # receive path finds what did not fit (NET_DP_OVERFLOW).
        self._bounce = ffi.from_buffer(dev._bounce)
        rx = self._dps[0]
        rx.bounce = ffi.cast("uint8_t *", self._bounce)
        rx.bounce_len = len(dev._bounce)

    def _prepare(self, dev: "Net", q: "Queue", index: int):
        dp = self._dps[index]
        key = ring_key(q)
        if key != self._keys[index]:
            if not bind_rings(dp, ffi, q):
                return None
            self._keys[index] = key
        tap = dev.tap
        dp.fd = tap.fd
        dp.skip = 0 if tap.vnet_hdr else VNET_HDR_LEN
        dp.indirect = 1 if q.indirect else 0
        dp.next_avail, dp.next_used = q.next_avail, q.next_used
        return dp

    def tx(self, dev: "Net", q: "Queue", limit: int) -> Tuple[int, bool]:
        """Send up to ``limit`` frames (counted in ``dev.tx_frames``): (how many, whether
        Python must take the next chain)."""
        dp = self._prepare(dev, q, 1)
        if dp is None:
            return 0, True
        done = lib.net_dp_tx(dp, limit)
        if done:
            dev.tx_frames += done
            _publish(q, dp)
        return done, dp.stop == NET_DP_HANDBACK

    def rx(self, dev: "Net", q: "Queue", limit: int) -> Tuple[int, int, int]:
        """Receive up to ``limit`` frames (counted in ``dev.rx_frames``): (how many, why it
        stopped, bytes of an overflow)."""
        dp = self._prepare(dev, q, 0)
        if dp is None:
            return 0, NET_DP_HANDBACK, 0
        dp.guest_csum = 1 if dev._guest_csum else 0
        done = lib.net_dp_rx(dp, limit)
        if done:
            dev.rx_frames += done
            _publish(q, dp)
        return done, dp.stop, dp.overflow


def _publish(q: "Queue", dp) -> None:
    """Take the ring positions back and make the used elements the C side wrote visible
    (x86 keeps stores in order: the elements before the index)."""
    q.next_avail, q.next_used = dp.next_avail, dp.next_used
    q.mem.write_u16(q.used_ring + 2, q.next_used)


def native_net(dev: "Net") -> Optional[NativeNet]:
    """The fast path for ``dev``, or None when it is switched off or was not built."""
    if os.environ.get("STRATOVIRT_NET_NATIVE", "on") == "off" or not built():
        return None
    return NativeNet(dev)


def fast_path(dev: "Net") -> Optional[NativeNet]:
    """The device's fast path, made on first use (None: Python moves every frame)."""
    native = dev._native
    if native is False:
        native = dev._native = native_net(dev)
    return native
