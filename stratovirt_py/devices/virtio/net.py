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

Threads: everything runs on the I/O thread.  The data path lives in ``net_rx.py`` and
``net_tx.py``, loaded at first use.  TX runs on a kick: each chain is written
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
    from typing import ClassVar, List, Optional

from ...errors import U32, ConfigError, DeviceError, SnapshotError
from ..tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN,
                   Tap)
from .device import COMMON_FEATURES, VIRTIO_ID_NET, VirtioDevice, bit
from .queue import Queue, QueueError

log = get_logger(__name__)

QUEUE_SIZE = 256
RX_QUEUE = 0
TX_QUEUE = 1
HDR_LEN = VNET_HDR_LEN          # virtio_net_hdr_v1
MAX_FRAME = 65536 + 64          # a GSO frame from the tap, with its Ethernet header
TX_BATCH = 256                  # frames per turn on the I/O thread

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
        self._native = False    # the C fast path (net_native): made at the first frame
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

    # -- the data path (net_rx.py, net_tx.py: loaded at first use, after the guest runs) ------
    def _process_rx(self) -> None:
        _path.process_rx(self)

    def _process_tx(self, batch: Optional[int] = None) -> None:
        _path.process_tx(self, batch or TX_BATCH)

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


class _DataPath:
    """net_rx and net_tx, imported at the first frame: an import statement per kick costs
    more than the attribute lookup that replaces it once they are loaded."""

    def __getattr__(self, name: str):
        from . import net_rx, net_tx
        self.process_rx = net_rx.process_rx
        self.process_tx = net_tx.process_tx
        return self.__dict__[name]


_path = _DataPath()


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
