"""virtio-net (virtio 1.x "Network Device") over a tap: one receive and one transmit queue.

Every buffer starts with the 12-byte ``virtio_net_hdr_v1`` (VIRTIO_F_VERSION_1):
``{u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size; le16 csum_start; le16 csum_offset;
le16 num_buffers}``.  With a vnet-header tap (``IFF_VNET_HDR``, length 12) the header goes
to and comes from the kernel as it is (offloads: the guest's checksum/TSO requests reach
the host stack, and the host hands the guest unsegmented, partially checksummed frames
when the guest accepts them); the device only fills in ``num_buffers`` and, when the
guest has not negotiated GUEST_CSUM, zeroes the rest as the spec requires.  A tap
without vnet headers gets frames without the header and no offload is offered.

Features: MAC, STATUS (link always up), MRG_RXBUF, and with a vnet-header tap that takes
``TUNSETOFFLOAD``: CSUM, GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6.  No control queue, no
multiqueue (a multi-queue tap is used through one queue).

Threads: everything runs on the I/O thread.  TX runs on a kick: each chain is written
to the tap with one ``writev`` straight from guest memory.  RX runs when the tap is
readable *and* the guest has receive buffers: one ``readv`` scatters the frame into the
guest's chain (a bounce buffer catches what does not fit; with MRG_RXBUF the rest spreads
over more chains).  When the receive ring is empty the tap fd is no longer watched
(back-pressure: frames wait in the tap's queue; the VMM drops none itself) until the
guest adds buffers and kicks.  A frame read before the ring ran dry (MRG_RXBUF only) is
held and delivered first; it is part of the saved state.

The state (``NetState``) holds the MAC, the offloads the guest acked and a held frame,
never which tap: a restored clone may run on another tap or fd.

Hot-replace: ``Net.empty()`` is the device of an empty slot (no MAC, link down);
``replace_backend(new)`` takes over another ``Net``'s tap and MAC (``None`` empties the
slot again) and raises a configuration-change interrupt for the link status.
"""

from __future__ import annotations

import errno
import select
import struct
import threading
import zlib
from ...logs import get_logger
from ...record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import ClassVar, List, Optional, Tuple

from ...errors import U32, ConfigError, DeviceError, SnapshotError
from ..tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN,
                   Tap)
from .device import COMMON_FEATURES, VIRTIO_ID_NET, VirtioDevice, bit
from .queue import DescriptorChain, Queue, QueueError

log = get_logger(__name__)

QUEUE_SIZE = 256
RX_QUEUE = 0
TX_QUEUE = 1
HDR_LEN = VNET_HDR_LEN          # virtio_net_hdr_v1
IOV_MAX = 1024
MAX_FRAME = 65536 + 64          # a GSO frame from the tap, with its Ethernet header
RX_BATCH = 64                   # frames per wake-up, so TX and other devices get a turn
TX_BATCH = 256

# Feature bits (virtio 1.x, "Feature bits" of the network device).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17

VIRTIO_NET_S_LINK_UP = 1

OFFLOAD_FEATURES = (bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM) |
                    bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6) |
                    bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6))

_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_ZERO_HDR = bytes(HDR_LEN - 2)


# -- MAC addresses ---------------------------------------------------------------------------
def parse_mac(value: str, where: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` -> 6 bytes; a ``ConfigError`` naming ``where`` otherwise."""
    parts = (value or "").split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                  for p in parts):
        raise ConfigError(f"{where}: invalid mac '{value}' (expected six hex bytes separated "
                          f"by ':', e.g. 52:54:00:12:34:56)")
    mac = bytes(int(x, 16) for x in value.split(":"))
    if mac[0] & 1:
        raise ConfigError(f"{where}: mac '{value}' is a multicast address (the lowest bit of "
                          f"the first byte must be 0)")
    if mac == bytes(6):
        raise ConfigError(f"{where}: mac '{value}' is all zeros")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(device_id: str) -> bytes:
    """52:54:00 (locally administered, unicast) + 3 bytes of a hash of the device id."""
    h = zlib.crc32(device_id.encode()) & 0xFFFFFF
    return bytes((0x52, 0x54, 0x00, h >> 16, (h >> 8) & 0xFF, h & 0xFF))


def guest_offloads(acked: int) -> int:
    """The TUNSETOFFLOAD flags for what the guest said it can receive."""
    flags = 0
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM):
        flags |= TUN_F_CSUM
        if acked & bit(VIRTIO_NET_F_GUEST_TSO4):
            flags |= TUN_F_TSO4
        if acked & bit(VIRTIO_NET_F_GUEST_TSO6):
            flags |= TUN_F_TSO6
        if acked & bit(VIRTIO_NET_F_GUEST_ECN) and flags & (TUN_F_TSO4 | TUN_F_TSO6):
            flags |= TUN_F_TSO_ECN
        if acked & bit(VIRTIO_NET_F_GUEST_UFO):
            flags |= TUN_F_UFO
    return flags


@record(frozen=True)
class NetState:
    VERSION: ClassVar[int] = 1
    mac: str               # aa:bb:cc:dd:ee:ff
    offloads: int          # TUN_F_* flags the guest's features asked for
    pending_rx: bytes      # a frame (with its 12-byte header) read but not yet delivered; b"" if none

    FIELDS: ClassVar[dict] = {"mac": ("str", 17), "offloads": ("int", 0, U32),
                              "pending_rx": ("bytes", MAX_FRAME + HDR_LEN)}


class Net(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_NET
    NAME = "virtio-net"
    QUEUE_SIZES = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, tap: Optional[Tap], mac: Optional[bytes], id: Optional[str] = None):
        """``tap=None``: an empty hot-replaceable slot (no MAC, link down)."""
        super().__init__(id)
        if mac is not None and len(mac) != 6:
            raise DeviceError(f"{self.id}: a MAC address has 6 bytes")
        self.tap = tap
        self.mac = bytes(mac) if mac is not None and tap is not None else None
        # Features are fixed for the device's life: a backend plugged in later cannot change
        # what the driver negotiated.  An empty slot offers offloads, as every tap the VMM
        # opens itself has vnet headers.
        self._offer_offloads = tap is None or (tap.vnet_hdr and tap.offloads_supported)
        self._config = self._make_config()
        self._io = None
        self._watch_lock = threading.Lock()
        self._watching = 0              # epoll mask the tap fd is registered with (0: not)
        self._watched_fd = -1
        self._want_rx = False
        self._tx_blocked = False
        self._tap_dead = False
        self._mrg = False
        self._guest_csum = False
        self._pending: Optional[bytes] = None          # held frame (MRG_RXBUF), with header
        self._restored_pending: Optional[bytes] = None
        self._bounce = bytearray(MAX_FRAME)
        self._bounce_view = memoryview(self._bounce)
        self.rx_frames = self.tx_frames = 0
        self.rx_dropped = self.tx_dropped = 0

    @classmethod
    def empty(cls, id: Optional[str] = None) -> "Net":
        """The device of an empty virtio-net slot, until ``replace_backend`` fills it."""
        return cls(None, None, id=id)

    @property
    def mac_str(self) -> str:
        """``aa:bb:cc:dd:ee:ff``, or "" for an empty slot."""
        return format_mac(self.mac) if self.mac is not None else ""

    def _make_config(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.tap is not None else 0
        return (self.mac or bytes(6)) + struct.pack("<HH", status, 1)

    def replace_backend(self, new: Optional["Net"]) -> None:
        """Hot-replace: take over ``new``'s tap and MAC, or become empty (link down) with None.

        The guest sees a configuration change (link status); frames held for the old tap
        are dropped.
        """
        if new is not None and new.tap is not None and self._offer_offloads and \
                not (new.tap.vnet_hdr and new.tap.offloads_supported):
            raise DeviceError(f"netdev {new.tap.netdev_id}: tap {new.tap.ifname} has no vnet "
                              f"header support, which the device in this slot needs")
        # The transport holds its lock around this and announces the config change.
        self._want_rx = self._tx_blocked = False
        self._update_watch()                 # forget the old fd
        old = self.tap
        self._pending = self._restored_pending = None
        if new is None:
            self.tap, self.mac = None, None
        else:
            self.tap, self.mac = new.tap, new.mac
            new.tap = None
            new.close()
        self._tap_dead = False
        self._config = self._make_config()
        if self.queues:
            acked = self.acked_features
            self._guest_csum = bool(acked & bit(VIRTIO_NET_F_GUEST_CSUM)) and self._vnet_hdr
            self._set_tap_offloads(guest_offloads(acked))
        if old is not None:
            old.close()
        self.run_on_device(self._process_rx)     # start reading the new tap

    @property
    def _vnet_hdr(self) -> bool:
        return self.tap is not None and self.tap.vnet_hdr

    # -- what the transport asks -----------------------------------------------------------
    def attach(self, iothread) -> None:
        self._io = iothread

    def features(self) -> int:
        f = COMMON_FEATURES | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | \
            bit(VIRTIO_NET_F_MRG_RXBUF)
        if self._offer_offloads:
            f |= OFFLOAD_FEATURES
        return f

    def config(self) -> bytes:
        """struct virtio_net_config: mac[6], le16 status, le16 max_virtqueue_pairs."""
        return self._config

    def activate(self, queues: List[Queue]) -> None:
        super().activate(queues)
        acked = self.acked_features
        self._mrg = bool(acked & bit(VIRTIO_NET_F_MRG_RXBUF))
        self._guest_csum = bool(acked & bit(VIRTIO_NET_F_GUEST_CSUM)) and self._vnet_hdr
        self._set_tap_offloads(guest_offloads(acked))
        if self._restored_pending is not None:
            self._pending, self._restored_pending = self._restored_pending, None

    def reset(self) -> None:
        super().reset()
        self._pending = None
        self._want_rx = False
        self._tx_blocked = False
        self._mrg = self._guest_csum = False
        self._update_watch()
        if self._vnet_hdr and self.tap.offloads:
            self._set_tap_offloads(0)

    def _set_tap_offloads(self, flags: int) -> None:
        if not self._vnet_hdr or flags == self.tap.offloads:
            return
        try:
            self.tap.set_offload(flags)
        except OSError as e:
            # The host then segments and checksums itself: frames stay valid for the guest.
            log.warning("%s: tap %s: TUNSETOFFLOAD %#x failed: %s", self.id, self.tap.ifname,
                        flags, e.strerror)

    def process_queue(self, index: int) -> None:
        if index == RX_QUEUE:
            self._process_rx()
        elif index == TX_QUEUE:
            self._process_tx()

    # -- watching the tap fd (I/O thread) --------------------------------------------------------
    def _update_watch(self) -> None:
        want = 0
        if self._io is not None and self.tap is not None and self.tap.fd >= 0 \
                and not self._tap_dead:
            if self._want_rx:
                want |= select.EPOLLIN
            if self._tx_blocked:
                want |= select.EPOLLOUT
        with self._watch_lock:
            if want == self._watching:
                return
            if want:
                self._io.register(self.tap.fd, self._on_tap_event, want)
                self._watched_fd = self.tap.fd
            else:
                self._io.unregister(self._watched_fd)
                self._watched_fd = -1
            self._watching = want

    def _on_tap_event(self) -> None:
        ran = False

        def work() -> None:
            nonlocal ran
            ran = True
            if self._tx_blocked:
                self._tx_blocked = False
                self._process_tx()
            if self._want_rx:
                self._process_rx()
            else:
                self._update_watch()
        self.run_on_device(work)
        if not ran:
            # Paused (snapshot) or not active: stop watching; resume()/activation runs the
            # queues again, which watches the tap again.
            self._want_rx = self._tx_blocked = False
            self._update_watch()

    def _tap_failed(self, what: str, err: OSError) -> None:
        if err.errno in (errno.EBADFD, errno.EBADF, errno.ENODEV):
            if not self._tap_dead:
                log.error("%s: tap %s is gone (%s: %s); the network is down",
                          self.id, self.tap.ifname, what, err.strerror)
            self._tap_dead = True
            self._update_watch()

    # -- receive (tap -> guest) ------------------------------------------------------------------
    def _process_rx(self) -> None:
        if not self.queues:
            self._want_rx = False
            self._update_watch()
            return
        q = self.queues[RX_QUEUE]
        used = 0
        try:
            if not q.ready or self._tap_dead or self.tap is None:
                self._want_rx = False
                return
            frames = 0
            while True:
                if frames >= RX_BATCH:
                    self._want_rx = True      # level-triggered: the loop comes back
                    return
                if self._pending is not None:
                    n = self._deliver_pending(q)
                    if n:
                        used += n
                        frames += 1
                        continue
                    if self._pending is not None:
                        # The ring holds too little for the held frame: wait for more.
                        if _ask_for_more_buffers(q):
                            continue
                        self._want_rx = False
                        return
                elif q.pending():
                    n = self._receive_one(q)
                    if n < 0:                 # nothing to read
                        self._want_rx = True
                        return
                    used += n
                    frames += 1
                    continue
                # Out of receive buffers: ask for a kick and stop reading the tap.
                if q.enable_notification():
                    continue
                self._want_rx = False
                return
        finally:
            self._update_watch()
            if used:
                self.signal_used(RX_QUEUE)

    def _receive_one(self, q: Queue) -> int:
        """Read one frame into the next chain(s); chains used, 0 if dropped, -1 if none waits."""
        chain = q.pop()
        cap = chain.writable_len
        if cap < HDR_LEN:
            raise QueueError(f"virtio-net receive buffer of {cap} bytes is smaller than the "
                             f"{HDR_LEN}-byte header")
        skip = 0 if self._vnet_hdr else HDR_LEN
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
            n = self.tap.readv(views + [self._bounce_view])
        except OSError as e:
            q.undo_pop()
            self.rx_dropped += 1
            self._tap_failed("read", e)
            if self._tap_dead:
                return -1
            log.debug("%s: tap read failed: %s", self.id, e.strerror)
            return 0
        if n is None:
            q.undo_pop()
            return -1
        if n == 0:                    # end of file: a tap never reads empty
            q.undo_pop()
            self._tap_failed("read", OSError(errno.ENODEV, "end of file"))
            return -1
        total = n + skip
        if total <= cap:
            if not views:
                chain.write(skip, self._bounce_view[:n])
            self._finish_header(chain, 1)
            q.add_used(chain.head, total)
            self.rx_frames += 1
            return 1
        # The frame does not fit in this chain.
        q.undo_pop()
        if not self._mrg:
            self._drop_rx(total, cap)
            return 0
        head = bytes(HDR_LEN) if skip else b""
        self._pending = head + b"".join(views) + bytes(self._bounce_view[:n - in_chain])
        return self._deliver_pending(q)

    def _deliver_pending(self, q: Queue) -> int:
        """Spread the held frame over as many chains as it needs; 0 if the ring has too few."""
        frame = self._pending
        assert frame is not None
        need = len(frame)
        chains: List[DescriptorChain] = []
        room = 0
        limit = q.size if self._mrg else 1
        while room < need:
            if len(chains) >= limit:
                for _ in chains:
                    q.undo_pop()
                self._pending = None
                self._drop_rx(need, room)
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
        if not self._guest_csum:
            buf[:HDR_LEN - 2] = _ZERO_HDR
        _U16.pack_into(buf, HDR_LEN - 2, len(chains))
        entries: List[Tuple[int, int]] = []
        off = 0
        for c in chains:
            piece = min(c.writable_len, need - off)
            c.write(0, memoryview(buf)[off:off + piece])
            entries.append((c.head, piece))
            off += piece
        _add_used_batch(q, entries)
        self._pending = None
        self.rx_frames += 1
        return len(chains)

    def _finish_header(self, chain: DescriptorChain, num_buffers: int) -> None:
        addr, n = chain.writable[0]
        if n >= HDR_LEN:          # the usual case: the header is in the first buffer
            if self._guest_csum:
                chain.mem.write(addr + HDR_LEN - 2, _U16.pack(num_buffers))
            else:
                chain.mem.write(addr, _ZERO_HDR + _U16.pack(num_buffers))
            return
        if self._guest_csum:
            chain.write(HDR_LEN - 2, _U16.pack(num_buffers))
        else:
            chain.write(0, _ZERO_HDR + _U16.pack(num_buffers))

    def _drop_rx(self, size: int, room: int) -> None:
        self.rx_dropped += 1
        (log.warning if self.rx_dropped == 1 else log.debug)(
            "%s: dropped a received frame of %d bytes: the guest's receive buffers hold %d "
            "(%d dropped so far)", self.id, size, room, self.rx_dropped)

    # -- transmit (guest -> tap) -------------------------------------------------------------------
    def _process_tx(self, batch: Optional[int] = None) -> None:
        batch = batch or TX_BATCH
        if not self.queues:
            return
        q = self.queues[TX_QUEUE]
        if not q.ready:
            return
        skip = 0 if self._vnet_hdr else HDR_LEN
        sent = 0
        try:
            while True:
                while q.pending():
                    if sent >= batch:
                        self.call_later(0, self._process_tx)
                        return
                    chain = q.pop()
                    if not self._send(chain, skip):
                        q.undo_pop()
                        self._tx_blocked = True
                        self._update_watch()
                        return
                    q.add_used(chain.head, 0)
                    sent += 1
                if not q.enable_notification():
                    break
        finally:
            if sent:
                self.signal_used(TX_QUEUE)

    def _send(self, chain: DescriptorChain, skip: int) -> bool:
        """Write one frame to the tap; False if the tap cannot take it now."""
        length = chain.readable_len
        if self.tap is None:
            self.tx_dropped += 1          # no backend: the link is down
            return True
        if length <= HDR_LEN or self._tap_dead:
            self._drop_tx(f"a transmit buffer of {length} bytes has no frame after the header"
                          if not self._tap_dead else "the tap is gone")
            return True
        views = chain.readable_views(skip)
        if len(views) > IOV_MAX:
            views = [b"".join(views)]
        try:
            n = self.tap.writev(views)
        except OSError as e:
            self._tap_failed("write", e)
            self._drop_tx(f"the tap refused a frame of {length - HDR_LEN} bytes: {e.strerror}")
            return True
        if n is None:
            return False
        self.tx_frames += 1
        return True

    def _drop_tx(self, why: str) -> None:
        self.tx_dropped += 1
        (log.warning if self.tx_dropped == 1 else log.debug)(
            "%s: transmit dropped: %s (%d dropped so far)", self.id, why, self.tx_dropped)

    # -- snapshot ---------------------------------------------------------------------------------
    def drain(self) -> None:
        """Send what the guest queued for transmission and stop reading the tap.

        Called by the paused transport.  TX chains the tap cannot take now stay in the
        ring (the restored clone or the resumed VM sends them).
        """
        try:
            active = self.transport is None or self.transport.active
            if self.queues and active:
                for _ in range(20):
                    self._tx_blocked = False
                    self._process_tx(batch=1 << 30)
                    if not self._tx_blocked:
                        break
                    if self.tap is not None:
                        select.select([], [self.tap.fd], [], 0.05)
        except QueueError as e:
            log.error("%s: transmit queue during drain: %s", self.id, e)
        finally:
            self._want_rx = self._tx_blocked = False
            self._update_watch()

    def save(self) -> NetState:
        pending = self._pending if self._pending is not None else self._restored_pending
        offloads = guest_offloads(self.acked_features) if self._vnet_hdr else 0
        return NetState(mac=self.mac_str, offloads=offloads, pending_rx=bytes(pending or b""))

    def restore(self, state: NetState) -> None:
        if not isinstance(state.mac, str) or state.mac.lower() != self.mac_str:
            raise SnapshotError(f"virtio-net '{self.id}': mac {self.mac_str} differs from the "
                                f"template's {state.mac}")
        if not isinstance(state.offloads, int) or state.offloads < 0:
            raise SnapshotError(f"virtio-net '{self.id}': invalid offloads {state.offloads!r} "
                                f"in the template")
        if state.offloads and self.tap is not None and \
                not (self.tap.vnet_hdr and self.tap.offloads_supported):
            raise SnapshotError(f"virtio-net '{self.id}': the template's guest uses checksum/TSO "
                                f"offloads, but tap {self.tap.ifname} has no vnet header support")
        pending = state.pending_rx
        if not isinstance(pending, (bytes, bytearray)) or \
                (pending and not HDR_LEN < len(pending) <= MAX_FRAME + HDR_LEN):
            raise SnapshotError(f"virtio-net '{self.id}': the template's pending frame is invalid")
        pending = bytes(pending) if pending else None
        if self.queues:          # the transport was restored (and activated us) first
            self._pending = pending
        else:                    # activate() adopts it
            self._restored_pending = pending

    def close(self) -> None:
        self._want_rx = self._tx_blocked = False
        self._update_watch()
        if self.tap is not None:
            self.tap.close()


_fence_lock = threading.Lock()


def _ask_for_more_buffers(q: Queue) -> bool:
    """Ask for a kick when the driver adds any buffer from now on; True if some came already.

    ``Queue.enable_notification`` asks for a kick past the device's position, which the
    driver has already passed when the buffers it posted are too few for a held frame.
    """
    seen = q.avail_idx()
    if q.event_idx:
        q.mem.write_u16(q.used_ring + 4 + 8 * q.size, seen)
    with _fence_lock:     # a locked instruction: a full barrier on x86
        pass
    return q.avail_idx() != seen


def _add_used_batch(q: Queue, entries: List[Tuple[int, int]]) -> None:
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


# -- from the command line -----------------------------------------------------------------------
def create_net(cfg, dev) -> Net:
    """The device for ``-device virtio-net-device,id=..,netdev=..[,mac=..]``."""
    where = f"-device virtio-net-device,id={dev.id}"
    props = dev.props
    netdev = cfg.netdevs[props["netdev"]]
    mac = parse_mac(props["mac"], where) if "mac" in props else default_mac(dev.id)
    users = [d.id for d in cfg.devices
             if d.driver == "virtio-net-device" and d.props.get("netdev") == netdev.id]
    if len(users) > 1:
        raise ConfigError(f"netdev {netdev.id} is used by more than one device "
                          f"({', '.join(users)})")
    if netdev.vhost or netdev.vhostfds:
        import os
        where_dev = ("does not exist on this host" if not os.path.exists("/dev/vhost-net")
                     else "is not used by this VMM")
        raise DeviceError(f"netdev {netdev.id}: vhost-net is not supported: /dev/vhost-net "
                          f"{where_dev}; remove vhost=on to use the built-in virtio-net")
    if netdev.queues > 1 or props.get("mq", "off") in ("on", "true"):
        log.warning("netdev %s: multiqueue is not supported; using one queue pair", netdev.id)
    if netdev.fds:
        tap = Tap.from_fds(netdev.id, netdev.fds)
    else:
        tap = Tap.open(netdev.id, netdev.ifname or "")
    try:
        return Net(tap, mac, id=dev.id)
    except BaseException:
        tap.close()
        raise
