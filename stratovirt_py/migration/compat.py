"""Does this command line describe the machine a template was taken from?

A template can only be restored into the same machine: same memory size, vCPU
count, the same devices in the same order with the same ids, the same virtio-net
MAC, virtio-blk serial and drive size.  A drive file may sit at another path (a
copy of the original is fine).  Every difference is named in one message.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Dict, List

from ..config import VmConfig
from ..errors import SnapshotError, check_fields

VERSION = 1
UNSUPPORTED_DRIVERS = {
    "virtio-balloon-device": "balloon",
    "vhost-user-fs-device": "vhost-user-fs",
    "vhost-vsock-device": "vhost-vsock",
}


def describe(cfg: VmConfig) -> Dict[str, Any]:
    """The parts of the configuration a template depends on (stored as the ``config`` section)."""
    devices = []
    for dev in cfg.devices:
        d: Dict[str, Any] = {"id": dev.id, "driver": dev.driver, "slot": dev.slot}
        if dev.driver == "virtio-blk-device":
            drive = cfg.drives[dev.props["drive"]]
            d["serial"] = dev.props.get("serial")
            d["readonly"] = drive.readonly
            try:
                d["drive_size"] = os.stat(drive.file).st_size
            except OSError:
                d["drive_size"] = None
        elif dev.driver == "virtio-net-device":
            d["mac"] = (dev.props.get("mac") or "").lower() or None
        devices.append(d)
    return {"machine": cfg.machine_type, "mem_size": cfg.mem_size, "nr_cpus": cfg.nr_cpus,
            "devices": devices}


# The ``config`` section as describe() writes it: checked before place_like() uses a
# slot number (a crafted one made it allocate without bound) or check() compares.
CONFIG_FIELDS = {"machine": ("str", 64), "mem_size": ("int", 0, 1 << 50),
                 "nr_cpus": ("int", 0, 1 << 10), "devices": ("list", 1 << 10)}
DEVICE_FIELDS = {"id": ("str", 255), "driver": ("str", 64), "slot": ("?int", 0, 1 << 10)}
DEVICE_EXTRA_FIELDS = {
    "virtio-blk-device": {"serial": ("?str", 256), "readonly": ("bool",),
                          "drive_size": ("?int", 0, 1 << 63)},
    "virtio-net-device": {"mac": ("?str", 17)},
}


def check_config(section: str, saved: Any) -> None:
    check_fields(section, saved, CONFIG_FIELDS)
    for i, dev in enumerate(saved["devices"]):
        driver = dev.get("driver") if isinstance(dev, dict) else None
        spec = dict(DEVICE_FIELDS, **DEVICE_EXTRA_FIELDS.get(driver, {}))
        check_fields(section, dev, spec, f"devices[{i}].")


def place_like(cfg: VmConfig, saved: Dict[str, Any]) -> None:
    """Put devices the template knows into the slots they had there.

    A device hot-plugged into slot N must come back in slot N even though the restore
    command line lists it among the others.
    """
    slots = {(d["driver"], d["id"]): d.get("slot") for d in saved.get("devices") or []}
    for dev in cfg.devices:
        slot = slots.get((dev.driver, dev.id))
        if slot is not None:
            dev.slot = slot


def unsupported_features(cfg: VmConfig) -> List[str]:
    """Features whose state cannot be part of a template (the product documentation's list)."""
    found = []
    if cfg.mem_share:
        found.append("mem-share=on")
    for dev in cfg.devices:
        if dev.driver in UNSUPPORTED_DRIVERS:
            found.append(f"{UNSUPPORTED_DRIVERS[dev.driver]} device '{dev.id}'")
    for net in cfg.netdevs.values():
        if net.vhost:
            found.append(f"vhost-net (netdev '{net.id}')")
    for obj in cfg.objects.values():
        if obj.kind == "memory-backend-file":
            found.append(f"file-backed memory (object '{obj.id}')")
        if obj.props.get("hugepages") or "hugetlbfs" in obj.props.get("mem-path", ""):
            found.append(f"huge pages (object '{obj.id}')")
    return found


def _mib(n: int) -> str:
    return f"{n >> 20} MiB"


def check(current: Dict[str, Any], saved: Dict[str, Any]) -> None:
    diffs: List[str] = []
    if current["mem_size"] != saved.get("mem_size"):
        diffs.append(f"-m is {_mib(current['mem_size'])} but the template has {_mib(saved.get('mem_size') or 0)}")
    if current["nr_cpus"] != saved.get("nr_cpus"):
        diffs.append(f"-smp is {current['nr_cpus']} but the template has {saved.get('nr_cpus')}")
    cur_devs, old_devs = current["devices"], saved.get("devices") or []
    cur_by_id = {(d["driver"], d["id"]): d for d in cur_devs}
    old_by_id = {(d["driver"], d["id"]): d for d in old_devs}
    missing = [f"{drv} '{i}'" for drv, i in old_by_id if (drv, i) not in cur_by_id]
    extra = [f"{drv} '{i}'" for drv, i in cur_by_id if (drv, i) not in old_by_id]
    if missing:
        diffs.append("the template has devices this command line lacks: " + ", ".join(missing))
    if extra:
        diffs.append("this command line has devices the template lacks: " + ", ".join(extra))
    for key, old in old_by_id.items():
        cur = cur_by_id.get(key)
        if cur is None:
            continue
        name = f"{cur['driver']} '{cur['id']}'"
        if cur.get("mac") != old.get("mac"):
            diffs.append(f"{name}: mac is {cur.get('mac') or 'the default'} but the template has "
                         f"{old.get('mac') or 'the default'}")
        if cur.get("serial") != old.get("serial"):
            diffs.append(f"{name}: serial is {cur.get('serial')!r} but the template has {old.get('serial')!r}")
        if "drive_size" in old and cur.get("drive_size") != old.get("drive_size"):
            diffs.append(f"{name}: the drive file is {cur.get('drive_size')} bytes but the template's "
                         f"was {old.get('drive_size')} bytes")
    if diffs:
        raise SnapshotError("the template does not match this configuration: " + "; ".join(diffs))
