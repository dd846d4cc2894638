"""virtio-net transmit path (guest -> tap), run on the I/O thread under the transport lock.

Loaded at the first transmit, after the guest runs: a restore does not wait for it.
Each chain is written to the tap with one ``writev`` straight from guest memory.  When
the tap cannot take a frame the chain goes back to the ring and ``Net`` watches the tap
for room (``_tx_blocked``): nothing is dropped for back-pressure.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from .net import Net

from ...logs import get_logger
from ..tap import VNET_HDR_LEN as HDR_LEN
from .net_native import fast_path
from .queue import DescriptorChain

log = get_logger("stratovirt_py.devices.virtio.net")   # one logger for the device

IOV_MAX = 1024
TX_QUEUE = 1


def process_tx(dev: "Net", batch: int) -> None:
    """Send up to ``batch`` frames, then come back later on the I/O thread for the rest."""
    if not dev.queues:
        return
    q = dev.queues[TX_QUEUE]
    if not q.ready:
        return
    skip = 0 if dev._vnet_hdr else HDR_LEN
    native = fast_path(dev) if dev.tap is not None and not dev._tap_dead else None
    sent = 0
    try:
        while True:
            while q.pending():
                if sent >= batch:
                    dev.call_later(0, dev._process_tx)
                    return
                if native is not None:
                    done, handback = native.tx(dev, q, batch - sent)
                    sent += done
                    if not handback:
                        continue
                chain = q.pop()
                if not send(dev, chain, skip):
                    q.undo_pop()
                    dev._tx_blocked = True
                    dev._update_watch()
                    return
                q.add_used(chain.head, 0)
                sent += 1
            if not q.enable_notification():
                break
    finally:
        if sent:
            dev.signal_used(TX_QUEUE)


def send(dev: "Net", chain: DescriptorChain, skip: int) -> bool:
    """Write one frame to the tap; False if the tap cannot take it now."""
    length = chain.readable_len
    if dev.tap is None:
        dev.tx_dropped += 1          # no backend: the link is down
        return True
    if length <= HDR_LEN or dev._tap_dead:
        drop_tx(dev, f"a transmit buffer of {length} bytes has no frame after the header"
                if not dev._tap_dead else "the tap is gone")
        return True
    views = chain.readable_views(skip)
    if len(views) > IOV_MAX:
        views = [b"".join(views)]
    try:
        n = dev.tap.writev(views)
    except OSError as e:
        dev._tap_failed("write", e)
        drop_tx(dev, f"the tap refused a frame of {length - HDR_LEN} bytes: {e.strerror}")
        return True
    if n is None:
        return False
    dev.tx_frames += 1
    return True


def drop_tx(dev: "Net", why: str) -> None:
    dev.tx_dropped += 1
    (log.warning if dev.tx_dropped == 1 else log.debug)(
        "%s: transmit dropped: %s (%d dropped so far)", dev.id, why, dev.tx_dropped)
