"""``Vm``: a KVM virtual machine file descriptor."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import TYPE_CHECKING

from .errors import KvmError
from .ioctls import ffi, ioctl, lib

if TYPE_CHECKING:
    from .system import Kvm
    from .vcpu import Vcpu

# Where KVM may put the real-mode TSS and identity map (x86 quirk): just below the
# BIOS area at the top of the 32-bit space, away from RAM and MMIO slots.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

IRQCHIP_IDS = {"pic-master": 0, "pic-slave": 1, "ioapic": 2}


def _copy_out(ptr) -> bytes:
    return bytes(ffi.buffer(ptr))


def _copy_in(ctype: str, data: bytes, what: str):
    ptr = ffi.new(ctype)
    size = ffi.sizeof(ptr[0])
    if len(data) != size:
        raise KvmError(what, 22, f"state blob is {len(data)} bytes, this host's KVM expects {size}")
    ffi.memmove(ptr, data, size)
    return ptr


class Vm:
    def __init__(self, kvm: "Kvm", fd: int):
        self.kvm = kvm
        self.fd = fd

    # -- memory -------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa,
            "memory_size": size, "userspace_addr": host_addr})
        ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    # -- platform -----------------------------------------------------------------
    def set_tss_addr(self, addr: int = TSS_ADDR) -> None:
        ioctl(self.fd, lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int = IDENTITY_MAP_ADDR) -> None:
        p = ffi.new("uint64_t *", addr)
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, p, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        ioctl(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        cfg = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    # -- interrupts and notifications -----------------------------------------------
    def irq_line(self, irq: int, level: int) -> None:
        arg = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        ioctl(self.fd, lib.KVM_IRQ_LINE, arg, "KVM_IRQ_LINE")

    def register_irqfd(self, fd: int, gsi: int) -> None:
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi})
        ioctl(self.fd, lib.KVM_IRQFD, arg, "KVM_IRQFD")

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi,
                                            "flags": lib.KVM_IRQFD_FLAG_DEASSIGN})
        ioctl(self.fd, lib.KVM_IRQFD, arg, "KVM_IRQFD")

    def _ioeventfd(self, fd: int, addr: int, length: int, datamatch, pio: bool, flags: int) -> None:
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        arg = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags})
        ioctl(self.fd, lib.KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    def register_ioeventfd(self, fd: int, addr: int, length: int = 4, datamatch=None,
                           pio: bool = False) -> None:
        self._ioeventfd(fd, addr, length, datamatch, pio, 0)

    def unregister_ioeventfd(self, fd: int, addr: int, length: int = 4, datamatch=None,
                             pio: bool = False) -> None:
        self._ioeventfd(fd, addr, length, datamatch, pio, lib.KVM_IOEVENTFD_FLAG_DEASSIGN)

    # -- state (opaque blobs in the host kernel's struct layout) -------------------
    def get_irqchip(self, chip: str) -> bytes:
        p = ffi.new("struct kvm_irqchip *", {"chip_id": IRQCHIP_IDS[chip]})
        ioctl(self.fd, lib.KVM_GET_IRQCHIP, p, "KVM_GET_IRQCHIP")
        return _copy_out(p)

    def set_irqchip(self, data: bytes) -> None:
        p = _copy_in("struct kvm_irqchip *", data, "KVM_SET_IRQCHIP")
        ioctl(self.fd, lib.KVM_SET_IRQCHIP, p, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        p = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, lib.KVM_GET_PIT2, p, "KVM_GET_PIT2")
        return _copy_out(p)

    def set_pit2(self, data: bytes) -> None:
        p = _copy_in("struct kvm_pit_state2 *", data, "KVM_SET_PIT2")
        ioctl(self.fd, lib.KVM_SET_PIT2, p, "KVM_SET_PIT2")

    def get_clock(self) -> int:
        p = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, lib.KVM_GET_CLOCK, p, "KVM_GET_CLOCK")
        return p.clock

    def set_clock(self, clock: int) -> None:
        p = ffi.new("struct kvm_clock_data *", {"clock": clock})
        ioctl(self.fd, lib.KVM_SET_CLOCK, p, "KVM_SET_CLOCK")

    # -- vCPUs -------------------------------------------------------------------------
    def create_vcpu(self, index: int) -> "Vcpu":
        from .vcpu import Vcpu
        fd = ioctl(self.fd, lib.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        return Vcpu(self, fd, index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
