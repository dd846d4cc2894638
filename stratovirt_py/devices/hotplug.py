"""Hot-replace on microvm: QMP's blockdev-add / netdev_add / device_add / device_del.

Devices sit in fixed, replaceable virtio-mmio slots (``devices.setup``): a backend
is registered first (``blockdev-add`` / ``netdev_add``), then ``device_add`` plugs
it into an empty slot of its type (``addr`` counts within the type, as StratoVirt
and Kata count it), and ``device_del`` empties the slot again and announces
``DEVICE_DELETED``.  The guest sees a configuration change of a device that was
there all along (a drive's capacity goes from 0 to the file's size and back).
The VM configuration follows, so a snapshot taken afterwards describes the devices
as they are now.
"""

from __future__ import annotations

import os
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Dict, Optional, Set

from ..logs import get_logger
from ..config import DeviceConfig, DriveConfig, NetdevConfig, check_id
from ..errors import ConfigError, DeviceError, VmmError
from .setup import REPLACEABLE

log = get_logger(__name__)

DRIVERS = {"virtio-blk-mmio": "virtio-blk-device", "virtio-blk-device": "virtio-blk-device",
           "virtio-net-mmio": "virtio-net-device", "virtio-net-device": "virtio-net-device"}


def _slot_number(addr: Optional[str], driver: str, count: int) -> Optional[int]:
    if addr is None:
        return None
    try:
        if not addr.isascii():
            raise ValueError(addr)
        n = int(addr, 0)
    except ValueError:
        raise ConfigError(f"device_add: invalid addr '{addr}' (a slot number such as 0x1)") from None
    if not 0 <= n < count:
        kind = "block" if "blk" in driver else "net"
        raise ConfigError(f"device_add: addr {addr} is out of range: the microvm has {count} "
                          f"replaceable {kind} slots (0..{count - 1})")
    return n


def _refuse_if_used(cfg, key: str, ref: str, what: str) -> None:
    users = [d.id for d in cfg.devices if d.props.get(key) == ref]
    if users:
        raise DeviceError(f"{what} '{ref}' is in use by device '{users[0]}' (device_del it first)")


class Hotplug:
    def __init__(self, vmm) -> None:
        self.vmm = vmm
        self._lock = threading.Lock()
        self._spent: Set[str] = set()    # netdevs whose fds a device has taken

    # -- backends -------------------------------------------------------------------------
    def blockdev_add(self, args: Dict[str, Any]) -> None:
        node = check_id("blockdev-add: node-name", args["node-name"])
        cfg = self.vmm.cfg
        if node in cfg.drives:
            raise ConfigError(f"blockdev-add: node-name '{node}' is already in use")
        fmt = args.get("driver", "raw")
        if fmt not in ("raw", "file"):
            raise ConfigError(f"blockdev-add: driver '{fmt}' is not supported (only raw)")
        f = args["file"]
        if f.get("driver", "file") != "file" or not f.get("filename"):
            raise ConfigError("blockdev-add: 'file' needs driver 'file' and a filename")
        direct = (args.get("cache") or {}).get("direct", True)
        with self._lock:
            cfg.drives[node] = DriveConfig(id=node, file=f["filename"],
                                           readonly=bool(args.get("read-only", False)),
                                           direct=bool(direct), aio=f.get("aio"),
                                           iops_total=args.get("throttling.iops-total"))

    def netdev_add(self, args: Dict[str, Any]) -> None:
        nid = check_id("netdev_add", args["id"])
        cfg = self.vmm.cfg
        if nid in cfg.netdevs:
            raise ConfigError(f"netdev_add: id '{nid}' is already in use")
        if args.get("vhost"):
            raise DeviceError("netdev_add: vhost-net is not supported by this VMM")
        # Only descriptors handed over with getfd, each taken once: a bare number could
        # name one of the VMM's own descriptors (its KVM fds), which the tap code would
        # then adopt or close.  Descriptors inherited at start are named on the command line.
        names = [n for n in (args.get("fds") or args.get("fd") or "").split(":") if n]
        if len(set(names)) != len(names):
            raise ConfigError(f"netdev_add: fd names {':'.join(names)} repeat a name")
        for name in names:
            if name not in self.vmm.fds:
                hint = (" (a bare number is not accepted: pass the descriptor with getfd and "
                        "name it here)" if name.isdigit() else " (send it with getfd)")
                raise ConfigError(f"netdev_add: no file descriptor named '{name}'{hint}")
        if not names and not args.get("ifname"):
            raise ConfigError("netdev_add: give 'ifname' or 'fd'")
        with self._lock:
            fds = [self.vmm.fds.pop(name) for name in names]
            cfg.netdevs[nid] = NetdevConfig(id=nid, ifname=args.get("ifname"), fds=fds)

    def blockdev_del(self, node: str) -> None:
        cfg = self.vmm.cfg
        with self._lock:
            if node not in cfg.drives:
                raise VmmError(f"blockdev-del: node-name '{node}' is not defined")
            _refuse_if_used(cfg, "drive", node, "blockdev-del: node-name")
            del cfg.drives[node]

    def netdev_del(self, nid: str) -> None:
        cfg = self.vmm.cfg
        with self._lock:
            netdev = cfg.netdevs.get(nid)
            if netdev is None:
                raise VmmError(f"netdev_del: netdev '{nid}' is not defined")
            _refuse_if_used(cfg, "netdev", nid, "netdev_del: netdev")
            if nid not in self._spent:      # never given to a device: still ours to close
                for fd in netdev.fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._spent.discard(nid)
            del cfg.netdevs[nid]

    # -- devices ----------------------------------------------------------------------------
    def device_add(self, args: Dict[str, Any]) -> None:
        vmm, cfg = self.vmm, self.vmm.cfg
        dev_id, qdriver = check_id("device_add", args["id"]), args["driver"]
        driver = DRIVERS.get(qdriver)
        if driver is None:
            raise ConfigError(f"device_add: driver '{qdriver}' cannot be hot-plugged on microvm "
                              "(virtio-blk-mmio or virtio-net-mmio)")
        if any(d.id == dev_id for d in cfg.devices):
            raise ConfigError(f"device_add: device id '{dev_id}' is already in use")
        first, count = REPLACEABLE[driver]
        want = _slot_number(args.get("addr"), driver, count)
        ref_key = "drive" if driver == "virtio-blk-device" else "netdev"
        ref = args.get(ref_key)
        table = cfg.drives if ref_key == "drive" else cfg.netdevs
        if not ref or ref not in table:
            raise ConfigError(f"device_add: {ref_key} '{ref}' is not defined "
                              f"(add it with {'blockdev-add' if ref_key == 'drive' else 'netdev_add'})")
        if ref_key == "netdev" and table[ref].fds:
            # A device owns its netdev's descriptors and closes them when it goes: they
            # serve one device_add only, or a later one would reuse numbers the VMM may
            # have given to something else since.
            if ref in self._spent:
                raise ConfigError(f"device_add: the file descriptors of netdev '{ref}' were "
                                  "used by a device already; add a new netdev")
        props = {ref_key: ref}
        for key in ("serial", "mac"):
            if key in args:
                props[key] = args[key]
        with self._lock:
            slots = {s.index: s for s in vmm.virtio_slots}
            if want is not None:
                slot = slots.get(first + want)
                if slot is None:
                    raise DeviceError(f"device_add: slot {want} has no device to replace")
                if slot.id is not None:
                    raise DeviceError(f"The slot {want} is occupied already.")
            else:
                free = [slots[i] for i in range(first, first + count) if i in slots and slots[i].id is None]
                if not free:
                    raise DeviceError(f"device_add: every replaceable {driver} slot is in use")
                slot = free[0]
            dev = DeviceConfig(driver=driver, id=dev_id, props=props, slot=slot.index)
            from .setup import create_device
            if ref_key == "netdev" and table[ref].fds:
                self._spent.add(ref)    # from here on the tap code may adopt or close them
            backend = create_device(vmm, dev)
            try:
                slot.transport.replace_backend(backend)
            except BaseException:
                backend.close()
                raise
            slot.id = dev_id
            cfg.devices.append(dev)
        log.info("device %s plugged into virtio slot %d", dev_id, slot.index)

    def device_del(self, dev_id: str) -> None:
        vmm, cfg = self.vmm, self.vmm.cfg
        with self._lock:
            slot = next((s for s in vmm.virtio_slots if s.id == dev_id), None)
            if slot is None:
                if any(d.id == dev_id for d in cfg.devices):
                    raise DeviceError(f"device '{dev_id}' cannot be removed (only virtio-blk and "
                                      "virtio-net devices are replaceable on microvm)")
                raise VmmError(f"Failed to detach device: id {dev_id} not found")
            slot.transport.replace_backend(None)
            slot.id = None
            for d in cfg.devices:       # a command-line device's fds are closed now too
                ref = d.props.get("netdev") if d.id == dev_id else None
                if ref in cfg.netdevs and cfg.netdevs[ref].fds:
                    self._spent.add(ref)
            cfg.devices[:] = [d for d in cfg.devices if d.id != dev_id]
        vmm.events.emit("DEVICE_DELETED", {"device": dev_id, "path": f"/machine/peripheral/{dev_id}"})
