"""Create the configured virtio devices and plug them into virtio-mmio slots.

The slot layout follows StratoVirt's microvm: the first slots are *replaceable* —
four virtio-blk slots then two virtio-net slots, always present, filled by the
command line's blk/net devices in order and by ``device_add`` later (empty ones
are drives of capacity 0 / nets with no link).  Other devices take the slots after
them.  Slot ``i`` sits at ``0xF010_0000 + i * 0x200`` with IRQ ``5 + i`` and is
announced on the kernel command line (``virtio_mmio.device=512@0x...:IRQ``).
Kicks reach the I/O thread through ioeventfds and interrupts go to the guest
through irqfds, so neither costs a trip through a vCPU thread's Python code.
"""

from __future__ import annotations

import os
from ..record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Dict, List, Optional

from ..boot import layout
from ..config import DeviceConfig, VmConfig, parse_int
from ..errors import ConfigError, DeviceError, SnapshotError, check_fields, field_error

MAX_SLOTS = layout.VIRTIO_LAST_IRQ - layout.VIRTIO_FIRST_IRQ + 1
REPLACEABLE = {"virtio-blk-device": (0, 4), "virtio-net-device": (4, 2)}   # first slot, count
FIRST_OTHER_SLOT = 6

UNSUPPORTED = {
    "vhost-vsock-device": "vhost-vsock needs /dev/vhost-vsock and is not supported by this VMM yet",
    "virtio-balloon-device": "virtio-balloon is not supported by this VMM yet",
    "vhost-user-fs-device": "vhost-user-fs (virtio-fs) is not supported by this VMM yet",
}


@record
class VirtioSlot:
    index: int
    base: int
    irq: int
    driver: str                      # fixed for the slot's life
    id: Optional[str] = None         # the device plugged in, None when empty
    transport: Any = None
    device: Any = None
    irqfd: int = -1

    @property
    def section(self) -> str:
        return f"virtio:slot{self.index}"

    def save(self) -> Dict[str, Any]:
        return {"driver": self.driver, "id": self.id, "transport": self.transport.save(),
                "device": self.device.save()}

    @staticmethod
    def check(section: str, data: Any) -> None:
        """The fields of a slot's section, before anything is built from them."""
        from .virtio.mmio import MmioTransportState
        check_fields(section, data, SLOT_FIELDS)
        MmioTransportState.check(section, data["transport"], "transport.")
        state_cls = _state_class(data["driver"])
        if state_cls is None:
            raise field_error(section, "driver", f"names no virtio device ({data['driver']!r})")
        check_fields(section, data["device"], state_cls.FIELDS, "device.")

    def restore(self, data: Dict[str, Any]) -> None:
        from .virtio.mmio import MmioTransportState
        if data.get("driver") != self.driver or data.get("id") != self.id:
            raise SnapshotError(f"virtio slot {self.index} holds {data.get('driver')} "
                                f"'{data.get('id')}' in the template, not {self.driver} '{self.id}'")
        state_cls = type(self.device.save())
        try:
            dev_state = state_cls(**data["device"])
            tr_state = MmioTransportState.from_dict(data["transport"])
        except (TypeError, KeyError) as e:
            raise SnapshotError(f"the template's state of virtio slot {self.index} is malformed: {e}") from None
        self.transport.restore(tr_state)
        self.device.restore(dev_state)


SLOT_FIELDS = {"driver": ("str", 64), "id": ("?str", 255), "transport": ("dict",),
               "device": ("dict",)}


def _state_class(driver: str):
    # Imported on demand, like the devices: a restore loads only the ones it has.
    if driver == "virtio-blk-device":
        from .virtio.blk import BlkState
        return BlkState
    if driver == "virtio-net-device":
        from .virtio.net import NetState
        return NetState
    if driver == "virtio-rng-device":
        from .virtio.rng import RngState
        return RngState
    if driver == "virtio-serial-device":
        from .virtio.console import ConsoleState
        return ConsoleState
    return None


def create_device(vmm, dev: DeviceConfig):
    """The VirtioDevice for one ``-device``, or None for devices that live inside another."""
    cfg = vmm.cfg
    p = dev.props
    if dev.driver == "virtio-blk-device":
        from .virtio.blk import Blk
        drive = cfg.drives[p["drive"]]
        return Blk(drive.file, readonly=drive.readonly, direct=drive.direct, serial=p.get("serial"),
                   iops_total=drive.iops_total, aio=drive.aio, id=dev.id)
    if dev.driver == "virtio-rng-device":
        from .virtio.rng import Rng
        obj = cfg.objects[p["rng"]]
        if obj.kind != "rng-random":
            raise ConfigError(f"-device virtio-rng-device,id={dev.id}: object '{obj.id}' is not rng-random")
        where = f"-device virtio-rng-device,id={dev.id}"
        max_bytes = parse_int(where, "max-bytes", p["max-bytes"], 1) if "max-bytes" in p else None
        period = parse_int(where, "period", p.get("period", "1000"), 1, 1 << 32)
        return Rng(obj.props.get("filename", "/dev/random"), max_bytes=max_bytes,
                   period_ms=period, id=dev.id)
    if dev.driver == "virtio-serial-device":
        from .chardev import CharBackend, backend_for
        from .virtio.console import Console
        ports = [d for d in cfg.devices if d.driver == "virtconsole"]
        if len(ports) > 1:
            raise ConfigError("only one virtconsole port per virtio-serial-device is supported")
        if ports:
            backend = backend_for(vmm, ports[0].props["chardev"])
        else:
            backend = CharBackend(dev.id)
        return Console(backend, id=dev.id)
    if dev.driver == "virtconsole":
        return None
    if dev.driver == "virtio-net-device":
        from .virtio.net import create_net
        return create_net(cfg, dev)
    raise ConfigError(f"-device {dev.driver} is not supported")


def create_empty(driver: str, index: int):
    """The device of an empty replaceable slot."""
    if driver == "virtio-blk-device":
        from .virtio.blk import Blk
        return Blk(None, id=f"slot{index}")
    from .virtio.net import Net
    return Net.empty(id=f"slot{index}")


def place(cfg: VmConfig) -> List[Optional[DeviceConfig]]:
    """Assign every virtio device a slot (keeping ``dev.slot`` where it is already set)."""
    slots: List[Optional[DeviceConfig]] = [None] * FIRST_OTHER_SLOT
    devs = [d for d in cfg.devices if d.driver not in ("virtconsole",) + tuple(UNSUPPORTED)]
    for d in devs:
        if d.slot is not None:
            while len(slots) <= d.slot:
                slots.append(None)
            if slots[d.slot] is not None:
                raise ConfigError(f"devices '{slots[d.slot].id}' and '{d.id}' both want slot {d.slot}")
            slots[d.slot] = d
    for d in devs:
        if d.slot is not None:
            continue
        if d.driver in REPLACEABLE:
            first, count = REPLACEABLE[d.driver]
            free = [i for i in range(first, first + count) if slots[i] is None]
            if not free:
                kind = "virtio-blk" if "blk" in d.driver else "virtio-net"
                raise ConfigError(f"too many {kind} devices: the microvm has {count} {kind} slots")
            d.slot = free[0]
        else:
            d.slot = max(len(slots), FIRST_OTHER_SLOT)
            slots.extend([None] * (d.slot + 1 - len(slots)))
        slots[d.slot] = d
    if len(slots) > MAX_SLOTS:
        raise ConfigError(f"too many virtio devices: the microvm has {MAX_SLOTS} virtio-mmio slots")
    return slots


def plug(vmm, index: int, driver: str, dev_id: Optional[str], device) -> VirtioSlot:
    from .virtio.mmio import EventFdIrq, MmioTransport
    base = layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_SIZE
    irq = layout.VIRTIO_FIRST_IRQ + index
    slot = VirtioSlot(index=index, base=base, irq=irq, driver=driver, id=dev_id, device=device)
    slot.irqfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    vmm.vm.register_irqfd(slot.irqfd, irq)
    slot.transport = MmioTransport(device, vmm.memory, EventFdIrq(slot.irqfd), vmm.iothread)
    for offset, datamatch, fd in slot.transport.ioeventfds():
        vmm.vm.register_ioeventfd(fd, base + offset, 4, datamatch=datamatch)
    vmm.mmio_bus.insert(slot.transport, base, layout.VIRTIO_MMIO_SIZE)
    vmm.kernel_cmdline_extra.append(f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE}@{base:#x}:{irq}")
    return slot


def add_virtio_devices(vmm) -> None:
    cfg = vmm.cfg
    # Refused, not left out: a guest started without the device it was promised (Kata's
    # vsock agent channel, a shared directory) fails later and far from the cause.
    for dev in cfg.devices:
        if dev.driver in UNSUPPORTED:
            raise DeviceError(f"-device {dev.driver},id={dev.id}: {UNSUPPORTED[dev.driver]}")
    layout_ = place(cfg)
    made = []
    try:
        for index, dev in enumerate(layout_):
            if dev is not None:
                made.append((index, dev.driver, dev.id, create_device(vmm, dev)))
            elif index < FIRST_OTHER_SLOT:
                driver = "virtio-blk-device" if index < REPLACEABLE["virtio-net-device"][0] else "virtio-net-device"
                made.append((index, driver, None, create_empty(driver, index)))
    except Exception:
        for *_, device in made:
            device.close()
        raise
    for index, driver, dev_id, device in made:
        vmm.virtio_slots.append(plug(vmm, index, driver, dev_id, device))
    vmm.cleanups.append(lambda: [s.transport.close() for s in vmm.virtio_slots])
