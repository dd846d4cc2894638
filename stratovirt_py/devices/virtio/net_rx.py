"""virtio-net receive path (tap -> guest), run on the I/O thread under the transport lock.

Loaded at the first receive, after the guest runs: a restore does not wait for it.
``Net`` (net.py) keeps the state - the held frame, whether the tap is watched - and the
decisions about watching the tap; this module moves frames.

One ``readv`` scatters a frame straight into the guest's chain, with a bounce buffer
behind it for what does not fit; with MRG_RXBUF the rest spreads over more chains
(``deliver_pending``).  When the ring runs dry the caller stops watching the tap, so
frames wait in the tap's queue (back-pressure) and none is dropped by the VMM.
"""

from __future__ import annotations

import errno
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import List, Optional, Tuple
    from .net import Net

from ...logs import get_logger
from ..tap import VNET_HDR_LEN as HDR_LEN
from .net_native import NET_DP_HANDBACK, NET_DP_OVERFLOW, NET_DP_TAP_EMPTY, fast_path
from .queue import DescriptorChain, Queue, QueueError, _fence

log = get_logger("stratovirt_py.devices.virtio.net")   # one logger for the device

IOV_MAX = 1024
RX_QUEUE = 0
RX_BATCH = 64                   # frames per wake-up, so TX and other devices get a turn

_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_ZERO_HDR = bytes(HDR_LEN - 2)


def process_rx(dev: "Net") -> None:
    """Move frames from the tap into the receive ring until either runs out (or a batch)."""
    if not dev.queues:
        dev._want_rx = False
        dev._update_watch()
        return
    q = dev.queues[RX_QUEUE]
    used = 0
    try:
        if not q.ready or dev._tap_dead or dev.tap is None:
            dev._want_rx = False
            return
        native = fast_path(dev)
        frames = 0
        while True:
            if frames >= RX_BATCH:
                dev._want_rx = True      # level-triggered: the loop comes back
                return
            if dev._pending is not None:
                n = deliver_pending(dev, q)
                if n:
                    used += n
                    frames += 1
                    continue
                if dev._pending is not None:
                    # The ring holds too little for the held frame: wait for more.
                    if ask_for_more_buffers(q):
                        continue
                    dev._want_rx = False
                    return
            elif q.pending():
                read = None
                if native is not None:
                    done, stop, read = native.rx(dev, q, RX_BATCH - frames)
                    used += done
                    frames += done
                    if stop == NET_DP_TAP_EMPTY:
                        dev._want_rx = True
                        return
                    if stop != NET_DP_OVERFLOW:
                        read = None
                        if stop != NET_DP_HANDBACK:
                            continue
                n = receive_one(dev, q, read)
                if n < 0:                 # nothing to read
                    dev._want_rx = True
                    return
                used += n
                frames += 1
                continue
            # Out of receive buffers: ask for a kick and stop reading the tap.
            if q.enable_notification():
                continue
            dev._want_rx = False
            return
    finally:
        dev._update_watch()
        if used:
            dev.signal_used(RX_QUEUE)


def receive_one(dev: "Net", q: Queue, read: Optional[int] = None) -> int:
    """Read one frame into the next chain(s); chains used, 0 if dropped, -1 if none waits.

    ``read``: the C fast path has read that many bytes into this chain and the bounce
    buffer already (a frame that did not fit), as the ``readv`` below would have.
    """
    chain = q.pop()
    cap = chain.writable_len
    if cap < HDR_LEN:
        raise QueueError(f"virtio-net receive buffer of {cap} bytes is smaller than the "
                         f"{HDR_LEN}-byte header")
    skip = 0 if dev._vnet_hdr else HDR_LEN
    segs = chain.writable
    if len(segs) >= IOV_MAX:
        views = []
    elif skip:
        views = chain.writable_views(skip)
    else:
        view = chain.mem.view
        views = [view(a, n) for a, n in segs]
    in_chain = (cap - skip) if views else 0
    try:
        n = dev.tap.readv(views + [dev._bounce_view]) if read is None else read
    except OSError as e:
        q.undo_pop()
        dev.rx_dropped += 1
        dev._tap_failed("read", e)
        if dev._tap_dead:
            return -1
        log.debug("%s: tap read failed: %s", dev.id, e.strerror)
        return 0
    if n is None:
        q.undo_pop()
        return -1
    if n == 0:                    # end of file: a tap never reads empty
        q.undo_pop()
        dev._tap_failed("read", OSError(errno.ENODEV, "end of file"))
        return -1
    total = n + skip
    if total <= cap:
        if not views:
            chain.write(skip, dev._bounce_view[:n])
        finish_header(dev, chain, 1)
        q.add_used(chain.head, total)
        dev.rx_frames += 1
        return 1
    # The frame does not fit in this chain.
    q.undo_pop()
    if not dev._mrg:
        drop_rx(dev, total, cap)
        return 0
    head = bytes(HDR_LEN) if skip else b""
    dev._pending = head + b"".join(views) + bytes(dev._bounce_view[:n - in_chain])
    return deliver_pending(dev, q)


def deliver_pending(dev: "Net", q: Queue) -> int:
    """Spread the held frame over as many chains as it needs; 0 if the ring has too few."""
    frame = dev._pending
    assert frame is not None
    need = len(frame)
    chains: List[DescriptorChain] = []
    room = 0
    limit = q.size if dev._mrg else 1
    while room < need:
        if len(chains) >= limit:
            for _ in chains:
                q.undo_pop()
            dev._pending = None
            drop_rx(dev, need, room)
            return 0
        if not q.pending():
            for _ in chains:
                q.undo_pop()
            return 0
        c = q.pop()
        cap = c.writable_len
        if cap < (HDR_LEN if not chains else 1):
            raise QueueError(f"virtio-net receive buffer of {cap} bytes is too small")
        chains.append(c)
        room += cap
    buf = bytearray(frame)
    if not dev._guest_csum:
        buf[:HDR_LEN - 2] = _ZERO_HDR
    _U16.pack_into(buf, HDR_LEN - 2, len(chains))
    entries: List[Tuple[int, int]] = []
    off = 0
    for c in chains:
        piece = min(c.writable_len, need - off)
        c.write(0, memoryview(buf)[off:off + piece])
        entries.append((c.head, piece))
        off += piece
    add_used_batch(q, entries)
    dev._pending = None
    dev.rx_frames += 1
    return len(chains)


def finish_header(dev: "Net", chain: DescriptorChain, num_buffers: int) -> None:
    addr, n = chain.writable[0]
    if n >= HDR_LEN:          # the usual case: the header is in the first buffer
        if dev._guest_csum:
            chain.mem.write(addr + HDR_LEN - 2, _U16.pack(num_buffers))
        else:
            chain.mem.write(addr, _ZERO_HDR + _U16.pack(num_buffers))
        return
    if dev._guest_csum:
        chain.write(HDR_LEN - 2, _U16.pack(num_buffers))
    else:
        chain.write(0, _ZERO_HDR + _U16.pack(num_buffers))


def drop_rx(dev: "Net", size: int, room: int) -> None:
    dev.rx_dropped += 1
    (log.warning if dev.rx_dropped == 1 else log.debug)(
        "%s: dropped a received frame of %d bytes: the guest's receive buffers hold %d "
        "(%d dropped so far)", dev.id, size, room, dev.rx_dropped)


def ask_for_more_buffers(q: Queue) -> bool:
    """Ask for a kick when the driver adds any buffer from now on; True if some came already.

    ``Queue.enable_notification`` asks for a kick past the device's position, which the
    driver has already passed when the buffers it posted are too few for a held frame.
    """
    seen = q.avail_idx()
    if q.event_idx:
        q.mem.write_u16(q.used_ring + 4 + 8 * q.size, seen)
    _fence()
    return q.avail_idx() != seen


def add_used_batch(q: Queue, entries: List[Tuple[int, int]]) -> None:
    """Put several used elements in the ring and publish them with one index update.

    A merged receive frame must become visible at once: a driver that sees its first
    buffer (num_buffers = n) before the others would count the rest as missing.
    """
    mem = q.mem
    for head, length in entries:
        slot = q.next_used % q.size
        _USED_ELEM.pack_into(mem.view(q.used_ring + 4 + 8 * slot, 8), 0, head, length)
        q.next_used = (q.next_used + 1) & 0xFFFF
    mem.write_u16(q.used_ring + 2, q.next_used)
