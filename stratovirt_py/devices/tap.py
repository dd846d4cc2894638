"""A Linux tap device as a virtio-net backend (``-netdev tap,id=ID,ifname=NAME|fd=N``).

Two ways to get one (ioctls and flags from Linux's ``<linux/if_tun.h>``):

* ``Tap.open(netdev_id, ifname)``: open ``/dev/net/tun`` and ``TUNSETIFF`` with
  ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``.  This attaches to the tap ``ifname``, or creates
  it (a transient tap that vanishes with the VMM) when it does not exist and the process
  has CAP_NET_ADMIN, as StratoVirt and QEMU do.
* ``Tap.from_fd(netdev_id, fd)``: an fd inherited from an orchestrator (Kata passes
  ``fds=3:4``).  ``TUNGETIFF`` checks that it is an attached tap without packet-info
  headers; whether it carries virtio-net headers (``IFF_VNET_HDR``) is read from the
  same flags, since they cannot be changed on an attached fd.

With a vnet header the header length is set to 12 (``TUNSETVNETHDRSZ``: the
``virtio_net_hdr_v1`` of VIRTIO_F_VERSION_1, whose last two bytes, ``num_buffers``,
the tap skips on read and ignores on write) and ``TUNSETOFFLOAD`` says which offloads the
guest can receive (checksum, TSO4/6, ECN, UFO).  Without one the device adds and strips
the header itself and no offloads are offered.  The fd is non-blocking; reads and
writes are one frame each.

A multi-queue tap handed over as several fds is used through its first queue: the
others are detached (``TUNSETQUEUE``/``IFF_DETACH_QUEUE``) so that the kernel steers
no frame to a queue nobody reads, then closed.

Every failure is a ``DeviceError`` naming the netdev.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import List, Optional

from ..logs import get_logger
from ..errors import DeviceError

log = get_logger(__name__)

TUN_PATH = "/dev/net/tun"

# ioctl numbers: _IOW('T', nr, int) = 0x400454nn, _IOR('T', nr, unsigned int) = 0x800454nn.
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETFEATURES = 0x800454CF
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9

# ifr_flags
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# TUNSETOFFLOAD bits
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

VNET_HDR_LEN = 12           # struct virtio_net_hdr_v1 (with num_buffers)
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")   # struct ifreq: name + ifr_flags, 40 bytes on x86_64


def _ifreq(name: str = "", flags: int = 0) -> bytes:
    return _IFREQ.pack(name.encode(), flags)


def _unpack_ifreq(buf: bytes):
    name, flags = _IFREQ.unpack(buf)
    return name.split(b"\0", 1)[0].decode(errors="replace"), flags


def _interface_exists(name: str) -> bool:
    try:
        import socket
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def _sysfs_tun_flags(name: str) -> Optional[int]:
    """The tun/tap flags of interface ``name`` in this namespace's sysfs, if it is one."""
    try:
        with open(f"/sys/class/net/{name}/tun_flags") as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return None


class Tap:
    """One queue of a tap device: a non-blocking fd that reads/writes whole frames."""

    def __init__(self, netdev_id: str, fd: int, ifname: str, vnet_hdr: bool, owned: bool):
        self.netdev_id = netdev_id
        self.fd = fd
        self.ifname = ifname
        self.vnet_hdr = vnet_hdr
        self.owned = owned
        self.offloads_supported = False
        self.offloads = 0
        if vnet_hdr:
            self._set_vnet_hdr_len()
            self.offloads_supported = self._probe_offloads()

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, netdev_id: str, ifname: str) -> "Tap":
        what = f"netdev {netdev_id}"
        if not ifname or len(ifname.encode()) >= IFNAMSIZ or "/" in ifname or ifname in (".", ".."):
            raise DeviceError(f"{what}: '{ifname}' is not a valid interface name "
                              f"(1 to {IFNAMSIZ - 1} characters, no '/')")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DeviceError(f"{what}: {TUN_PATH} does not exist (is the tun module loaded?); "
                              f"cannot open tap {ifname}") from None
        except OSError as e:
            raise DeviceError(f"{what}: cannot open {TUN_PATH} for tap {ifname}: {e.strerror}") from None
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            try:
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(ifname, flags))
            except OSError as e:
                if e.errno == errno.EINVAL and _interface_exists(ifname):
                    # An existing multi-queue tap only takes multi-queue attachments.
                    try:
                        fcntl.ioctl(fd, TUNSETIFF, _ifreq(ifname, flags | IFF_MULTI_QUEUE))
                    except OSError:
                        raise e from None
                else:
                    raise
            name, got = _unpack_ifreq(fcntl.ioctl(fd, TUNGETIFF, _ifreq()))
            return cls(netdev_id, fd, name or ifname, bool(got & IFF_VNET_HDR), owned=True)
        except OSError as e:
            os.close(fd)
            raise DeviceError(cls._setiff_message(what, ifname, e)) from None
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _setiff_message(what: str, ifname: str, e: OSError) -> str:
        exists = _interface_exists(ifname)
        if e.errno == errno.EPERM:
            if not exists:
                return (f"{what}: tap device {ifname} does not exist, and creating it needs "
                        f"CAP_NET_ADMIN, which the VMM gives up once the VM runs (create it "
                        f"first: ip tuntap add {ifname} mode tap [user U], or pass its fd)")
            return (f"{what}: permission denied attaching to tap {ifname} (it belongs to another "
                    f"user or group; see ip tuntap add ... user/group)")
        if e.errno == errno.EBUSY:
            return f"{what}: tap {ifname} is in use by another process"
        if e.errno == errno.EINVAL and exists:
            return f"{what}: {ifname} is not a tap device (or its flags do not allow attaching)"
        return f"{what}: cannot attach to tap {ifname}: {e.strerror}"

    @classmethod
    def from_fd(cls, netdev_id: str, fd: int) -> "Tap":
        """Adopt an inherited fd (the caller stops owning it only on success)."""
        what = f"netdev {netdev_id}: fd {fd}"
        try:
            st = os.fstat(fd)
        except OSError as e:
            if e.errno == errno.EBADF:
                raise DeviceError(f"{what} is not open (was it passed to the VMM?)") from None
            raise DeviceError(f"{what}: {e.strerror}") from None
        if not stat.S_ISCHR(st.st_mode):
            raise DeviceError(f"{what} is not a tap device (not a character device)")
        try:
            name, flags = _unpack_ifreq(fcntl.ioctl(fd, TUNGETIFF, _ifreq()))
        except OSError as e:
            if e.errno == errno.EBADFD:
                raise DeviceError(f"{what} is /dev/net/tun but not attached to a tap") from None
            raise DeviceError(f"{what} is not a tap device ({e.strerror})") from None
        if not flags & IFF_TAP:
            raise DeviceError(f"{what} is a tun device ({name}), not a tap")
        # TUNGETIFF reports 0x1000 as IFF_NOFILTER (no socket filter), the same bit as
        # IFF_NO_PI; the device's own flags are in sysfs (when it is in our namespace).
        sys_flags = _sysfs_tun_flags(name)
        if sys_flags is not None and sys_flags & IFF_TAP and not sys_flags & IFF_NO_PI:
            raise DeviceError(f"{what}: tap {name} was opened without IFF_NO_PI (packet "
                              f"information headers are not supported)")
        try:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"{what}: cannot make it non-blocking: {e.strerror}") from None
        return cls(netdev_id, fd, name, bool(flags & IFF_VNET_HDR), owned=True)

    @classmethod
    def from_fds(cls, netdev_id: str, fds: List[int]) -> "Tap":
        """The first fd of a (possibly multi-queue) tap; the other queues are detached."""
        if len(set(fds)) != len(fds):
            raise DeviceError(f"netdev {netdev_id}: fds {':'.join(map(str, fds))} name a "
                              f"descriptor more than once")
        tap = cls.from_fd(netdev_id, fds[0])
        # The extra queues are closed below: each must be a queue of this same tap, or a
        # wrong number would close a descriptor the VMM itself uses (its KVM fds, say).
        for extra in fds[1:]:
            try:
                name, _ = _unpack_ifreq(fcntl.ioctl(extra, TUNGETIFF, _ifreq()))
            except OSError:
                name = None
            if name != tap.ifname:
                tap.owned = False       # the caller keeps every fd when we refuse
                raise DeviceError(f"netdev {netdev_id}: fd {extra} is not a queue of tap "
                                  f"{tap.ifname}")
        for extra in fds[1:]:
            try:
                fcntl.ioctl(extra, TUNSETQUEUE, _ifreq("", IFF_DETACH_QUEUE))
            except OSError as e:
                log.warning("netdev %s: cannot detach tap queue fd %d: %s", netdev_id, extra, e.strerror)
            try:
                os.close(extra)
            except OSError:
                pass
        if len(fds) > 1:
            log.warning("netdev %s: multiqueue is not supported; using one queue of tap %s",
                        netdev_id, tap.ifname)
        return tap

    # -- vnet header and offloads ------------------------------------------------------------
    def _set_vnet_hdr_len(self) -> None:
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as e:
            raise DeviceError(f"netdev {self.netdev_id}: tap {self.ifname}: cannot set the "
                              f"vnet header size to {VNET_HDR_LEN}: {e.strerror}") from None

    def _probe_offloads(self) -> bool:
        try:
            self.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            self.set_offload(0)
            return True
        except OSError:
            try:
                self.set_offload(0)
            except OSError:
                pass
            return False

    def set_offload(self, flags: int) -> None:
        """What the guest can receive (TUN_F_*); raises OSError."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        self.offloads = flags

    # -- frames --------------------------------------------------------------------------------
    def readv(self, buffers) -> Optional[int]:
        """Read one frame into ``buffers``; None when none is waiting (EAGAIN)."""
        try:
            return os.readv(self.fd, buffers)
        except BlockingIOError:
            return None

    def writev(self, buffers) -> Optional[int]:
        """Write one frame; None when the tap cannot take it now (EAGAIN)."""
        try:
            return os.writev(self.fd, buffers)
        except BlockingIOError:
            return None

    def close(self) -> None:
        if self.fd >= 0 and self.owned:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1

    def __repr__(self) -> str:
        return f"Tap({self.ifname!r}, fd={self.fd}, vnet_hdr={self.vnet_hdr})"
