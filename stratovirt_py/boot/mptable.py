"""Intel MultiProcessor Specification 1.4 table: how the guest learns its CPUs and IOAPIC."""

from __future__ import annotations

import struct

from ..memory import GuestMemory
from . import layout

APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
CPU_SIGNATURE = 0x600
CPU_FEATURES = 0x201          # FPU + APIC
MP_IRQ_INT = 0
MP_IRQ_NMI = 1
MP_IRQ_EXTINT = 3
IOAPIC_PINS = 24


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def mptable_size(nr_cpus: int) -> int:
    return 16 + 44 + 20 * nr_cpus + 8 + 8 + 8 * IOAPIC_PINS + 8 * 2


def write_mptable(mem: GuestMemory, nr_cpus: int, addr: int = layout.MPTABLE_ADDR) -> None:
    entries = bytearray()
    for cpu in range(nr_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += struct.pack("<BBBBIIQ", 0, cpu, APIC_VERSION, flags,
                               CPU_SIGNATURE, CPU_FEATURES, 0)
    entries += struct.pack("<BB6s", 1, 0, b"ISA   ")
    ioapic_id = nr_cpus
    entries += struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR)
    for pin in range(IOAPIC_PINS):
        kind = MP_IRQ_EXTINT if pin == 0 else MP_IRQ_INT
        entries += struct.pack("<BBHBBBB", 3, kind, 0, 0, pin, ioapic_id, pin)
    # Local interrupts: ExtINT to LINT0 and NMI to LINT1 of every local APIC.
    entries += struct.pack("<BBHBBBB", 4, MP_IRQ_EXTINT, 0, 0, 0, 0xFF, 0)
    entries += struct.pack("<BBHBBBB", 4, MP_IRQ_NMI, 0, 0, 0, 0xFF, 1)
    count = nr_cpus + 1 + 1 + IOAPIC_PINS + 2

    table_addr = addr + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(entries), 4, 0,
                                   b"STRATOV ", b"MICROVM     ", 0, 0, count,
                                   layout.LAPIC_ADDR, 0, 0, 0))
    header[7] = _checksum(bytes(header) + bytes(entries))
    fp = bytearray(struct.pack("<4sIBBBBBBBB", b"_MP_", table_addr, 1, 4, 0, 0, 0, 0, 0, 0))
    fp[10] = _checksum(bytes(fp))
    mem.write(addr, bytes(fp) + bytes(header) + bytes(entries))
