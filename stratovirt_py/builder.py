"""One builder for boot and restore.

Both paths create the same machine in the same order (KVM, VM, irqchip, RAM,
legacy devices, virtio devices, vCPUs); they differ only in the last step:
boot loads the kernel and sets boot registers, restore loads saved state.
vCPUs are left parked; ``Vmm.start`` lets them run.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Optional

from .logs import get_logger
from .boot import cpu as boot_cpu
from .boot import layout
from .config import VmConfig
from .devices.i8042 import I8042
from .devices.power import PowerButton
from .devices.serial import Serial
from .errors import BootError
from .kvm import Kvm
from .memory import GuestMemory
from .vcpu_thread import VcpuGroup
from .vmm import Vmm

log = get_logger(__name__)


def create_vm(cfg: VmConfig, events: Any, memory: Optional[GuestMemory] = None) -> Vmm:
    """Everything common to boot and restore; RAM comes from ``memory`` when given."""
    kvm = Kvm()
    vm = kvm.create_vm()
    if memory is None:
        memory = GuestMemory.anonymous(cfg.mem_size)
    # RAM before the irqchip: once an irqchip exists, every memslot change waits for
    # an SRCU grace period on kvm_pvm (~8 ms measured), before it, none (~0.1 ms).
    for slot, region in enumerate(memory.regions):
        vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
    vm.set_tss_addr()
    vm.set_identity_map_addr()
    vm.create_irqchip()
    vm.create_pit2()
    vmm = Vmm(cfg, kvm, vm, memory, events)
    from .devices.iothread import IoThread
    vmm.iothread = IoThread()
    _add_legacy_devices(vmm)
    from .devices.setup import add_virtio_devices   # virtio wiring lives with the devices
    add_virtio_devices(vmm)
    supported = kvm.get_supported_cpuid()
    for i in range(cfg.nr_cpus):
        vcpu = vm.create_vcpu(i)
        boot_cpu.setup_cpuid(vcpu, supported, i, cfg.nr_cpus)
        vmm.vcpus.append(vcpu)
    vmm.group = VcpuGroup(vmm.vcpus, vmm.pio_bus, vmm.mmio_bus, vmm.request_exit)
    return vmm


def _serial_backend(vmm: Vmm):
    """The chardev behind COM1 (``-serial``)."""
    from .devices.chardev import CharBackend, backend_for, create_chardev
    s = vmm.cfg.serial
    if s.kind == "chardev":
        return backend_for(vmm, s.chardev)
    if s.kind == "none":
        return CharBackend("serial0")
    backend = create_chardev(s.kind, "serial0", s.path, server=True, nowait=True)
    vmm.cleanups.append(backend.close)
    return backend


def _add_legacy_devices(vmm: Vmm) -> None:
    vm = vmm.vm
    backend = _serial_backend(vmm)
    vmm.serial = Serial(backend.write, lambda level: vm.irq_line(layout.SERIAL_IRQ, level))
    backend.set_receiver(vmm.serial.enqueue_input)
    backend.attach(vmm.iothread)
    vmm.pio_bus.insert(vmm.serial, layout.SERIAL_PORT, 8)
    vmm.i8042 = I8042(vmm.on_guest_reset, lambda level: vm.irq_line(layout.I8042_IRQ, level))
    vmm.pio_bus.insert(vmm.i8042, layout.I8042_DATA_PORT, 5)
    vmm.pio_bus.insert(PowerButton(vmm.on_guest_poweroff), layout.POWER_PORT, 2)


def boot_vmm(cfg: VmConfig, events: Any) -> Vmm:
    from .boot.loader import load_initrd, load_kernel
    from .boot.mptable import write_mptable
    from .boot.params import write_boot_params
    vmm = create_vm(cfg, events)
    mem = vmm.memory
    kernel = load_kernel(mem, cfg.kernel)
    initrd = load_initrd(mem, cfg.initrd, kernel.end) if cfg.initrd else None
    cmdline = " ".join([cfg.cmdline] + vmm.kernel_cmdline_extra).strip().encode()
    if len(cmdline) >= layout.CMDLINE_MAX:
        raise BootError(f"kernel command line is too long ({len(cmdline)} bytes)")
    write_boot_params(mem, cmdline, kernel.setup_header, initrd)
    write_mptable(mem, cfg.nr_cpus)
    boot_cpu.write_boot_tables(mem)
    for vcpu in vmm.vcpus:
        boot_cpu.setup_lapic(vcpu)
    boot_cpu.setup_boot_registers(vmm.vcpus[0], kernel.entry)
    return vmm
