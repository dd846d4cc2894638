"""Create the configured virtio devices and plug them into virtio-mmio slots.

Slot ``i`` sits at ``0xF010_0000 + i * 0x200`` with IRQ ``5 + i`` and is announced
to the guest on the kernel command line (``virtio_mmio.device=512@0x...:IRQ``).
Kicks reach the I/O thread through ioeventfds and interrupts go to the guest
through irqfds, so neither costs a trip through a vCPU thread's Python code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..boot import layout
from ..config import DeviceConfig, VmConfig
from ..errors import ConfigError, DeviceError, SnapshotError

MAX_SLOTS = layout.VIRTIO_LAST_IRQ - layout.VIRTIO_FIRST_IRQ + 1

# A device's whole life is in its module; this table only says which one.
UNSUPPORTED = {
    "vhost-vsock-device": "vhost-vsock needs /dev/vhost-vsock and is not supported by this VMM yet",
    "virtio-balloon-device": "virtio-balloon is not supported by this VMM yet",
    "vhost-user-fs-device": "vhost-user-fs (virtio-fs) is not supported by this VMM yet",
}


@dataclass
class VirtioSlot:
    index: int
    base: int
    irq: int
    id: Optional[str] = None
    driver: Optional[str] = None
    transport: Any = None
    device: Any = None
    irqfd: int = -1

    def restore(self, data: Dict[str, Any]) -> None:
        from .virtio.mmio import MmioTransportState
        if data.get("driver") != self.driver:
            raise SnapshotError(f"template slot of '{self.id}' holds a {data.get('driver')}, "
                                f"not a {self.driver}")
        state_cls = type(self.device.save())
        try:
            dev_state = state_cls(**data["device"])
            tr_state = MmioTransportState.from_dict(data["transport"])
        except (TypeError, KeyError) as e:
            raise SnapshotError(f"the template's state of device '{self.id}' is malformed: {e}") from None
        self.transport.restore(tr_state)
        self.device.restore(dev_state)


def create_device(cfg: VmConfig, dev: DeviceConfig):
    """The VirtioDevice for one ``-device``, or None for devices that live inside another."""
    p = dev.props
    if dev.driver in UNSUPPORTED:
        raise DeviceError(f"-device {dev.driver},id={dev.id}: {UNSUPPORTED[dev.driver]}")
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
        max_bytes = int(p["max-bytes"]) if "max-bytes" in p else None
        period = int(p.get("period", "1000"))
        return Rng(obj.props.get("filename", "/dev/random"), max_bytes=max_bytes,
                   period_ms=period, id=dev.id)
    if dev.driver == "virtio-serial-device":
        from .chardev import create_chardev
        from .virtio.console import Console
        ports = [d for d in cfg.devices if d.driver == "virtconsole"]
        if len(ports) > 1:
            raise ConfigError("only one virtconsole port per virtio-serial-device is supported")
        if ports:
            ch = cfg.chardevs[ports[0].props["chardev"]]
            backend = create_chardev(ch.backend, ch.id, ch.path, server=ch.server, nowait=ch.nowait)
        else:
            from .chardev import CharBackend
            backend = CharBackend(dev.id)
        return Console(backend, id=dev.id)
    if dev.driver == "virtconsole":
        return None
    if dev.driver == "virtio-net-device":
        from .virtio.net import create_net
        return create_net(cfg, dev)
    raise ConfigError(f"-device {dev.driver} is not supported")


def plug(vmm, index: int, dev_id: str, driver: str, device) -> VirtioSlot:
    from .virtio.mmio import EventFdIrq, MmioTransport
    base = layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_SIZE
    irq = layout.VIRTIO_FIRST_IRQ + index
    slot = VirtioSlot(index=index, base=base, irq=irq, id=dev_id, driver=driver, device=device)
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
    made = []
    try:
        for dev in cfg.devices:
            device = create_device(cfg, dev)
            if device is not None:
                made.append((dev, device))
    except Exception:
        for _, device in made:
            device.close()
        raise
    if not made:
        return
    if len(made) > MAX_SLOTS:
        raise ConfigError(f"too many virtio devices: the microvm has {MAX_SLOTS} virtio-mmio slots")
    for index, (dev, device) in enumerate(made):
        vmm.virtio_slots.append(plug(vmm, index, dev.id, dev.driver, device))
    vmm.cleanups.append(lambda: [s.transport.close() for s in vmm.virtio_slots if s.transport])
