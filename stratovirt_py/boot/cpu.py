"""x86_64 vCPU set-up: CPUID, and the register state of the Linux 64-bit boot entry."""

from __future__ import annotations

import struct

from ..logs import get_logger
from ..kvm import KvmError, Vcpu
from ..kvm.ioctls import ffi
from ..memory import GuestMemory
from . import layout

log = get_logger(__name__)

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# GDT entries (flags/access in the 0xAFAA layout used by StratoVirt/Firecracker).
GDT_CODE = 0xA09B
GDT_DATA = 0xC093
GDT_TSS = 0x808B

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _gdt_entry(flags: int, base: int, limit: int) -> int:
    return (((base & 0xFF00_0000) << (56 - 24)) | ((flags & 0xF0FF) << 40) |
            ((limit & 0xF_0000) << (48 - 16)) | ((base & 0x00FF_FFFF) << 16) | (limit & 0xFFFF))


def _segment(seg, entry: int, index: int) -> None:
    seg.base = ((entry >> 16) & 0xFF_FFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if g else limit
    seg.selector = index * 8
    seg.type = (entry >> 40) & 0xF
    seg.s = (entry >> 44) & 1
    seg.dpl = (entry >> 45) & 3
    seg.present = (entry >> 47) & 1
    seg.avl = (entry >> 52) & 1
    seg.l = (entry >> 53) & 1
    seg.db = (entry >> 54) & 1
    seg.g = g
    seg.unusable = 0 if seg.present else 1


def write_boot_tables(mem: GuestMemory) -> None:
    """GDT, empty IDT and the identity-mapped page tables of the 64-bit boot protocol."""
    gdt = [0, _gdt_entry(GDT_CODE, 0, 0xFFFFF), _gdt_entry(GDT_DATA, 0, 0xFFFFF),
           _gdt_entry(GDT_TSS, 0, 0xFFFFF)]
    mem.write(layout.GDT_ADDR, struct.pack("<4Q", *gdt))
    mem.write_u64(layout.IDT_ADDR, 0)
    mem.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | 0x03)
    mem.write_u64(layout.PDPT_ADDR, layout.PD_ADDR | 0x03)
    # 512 x 2 MiB pages: present | writable | page size.
    mem.write(layout.PD_ADDR, struct.pack("<512Q", *((i << 21) | 0x83 for i in range(512))))


def setup_boot_registers(vcpu: Vcpu, entry: int) -> None:
    sregs = vcpu.get("sregs")
    gdt = [0, _gdt_entry(GDT_CODE, 0, 0xFFFFF), _gdt_entry(GDT_DATA, 0, 0xFFFFF),
           _gdt_entry(GDT_TSS, 0, 0xFFFFF)]
    _segment(sregs.cs, gdt[1], 1)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, gdt[2], 2)
    _segment(sregs.tr, gdt[3], 3)
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = 4 * 8 - 1
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = 7
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set("sregs", sregs)

    regs = ffi.new("struct kvm_regs *")
    regs.rflags = 0x2
    regs.rip = entry
    regs.rsp = regs.rbp = layout.BOOT_STACK
    regs.rsi = layout.BOOT_PARAMS_ADDR
    vcpu.set("regs", regs)

    fpu = ffi.new("struct kvm_fpu *")
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set("fpu", fpu)

    msrs = [(MSR_IA32_SYSENTER_CS, 0), (MSR_IA32_SYSENTER_ESP, 0), (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0), (MSR_CSTAR, 0), (MSR_KERNEL_GS_BASE, 0), (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0), (MSR_IA32_TSC, 0), (MSR_IA32_MISC_ENABLE, 1),
            (MSR_MTRR_DEF_TYPE, (1 << 11) | 6)]
    for msr in msrs:
        try:
            vcpu.set_msrs([msr])
        except KvmError as e:
            log.debug("boot MSR %#x not set: %s", msr[0], e)


def setup_lapic(vcpu: Vcpu) -> None:
    """Route LINT0 as ExtINT (legacy PIC) and LINT1 as NMI, as a PC BIOS leaves them."""
    lapic = vcpu.get("lapic")
    buf = ffi.buffer(lapic.regs)
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", buf, reg)[0]
        value = (value & ~0x700) | (mode << 8)
        struct.pack_into("<I", buf, reg, value)
    vcpu.set("lapic", lapic)


def setup_cpuid(vcpu: Vcpu, supported, index: int, nr_cpus: int) -> None:
    """Per-vCPU CPUID: APIC ids, the hypervisor bit and the CPU count."""
    n = supported.nent
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
    ffi.memmove(cpuid.entries, supported.entries, n * ffi.sizeof("struct kvm_cpuid_entry2"))
    for i in range(n):
        e = cpuid.entries[i]
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000_FFFF) | (index << 24) | ((nr_cpus & 0xFF) << 16)
            e.ecx |= 1 << 31
            if nr_cpus > 1:
                e.edx |= 1 << 28
        elif e.function in (0xB, 0x1F):
            e.edx = index
        elif e.function == 0xA:
            # No PMU: its state cannot be part of a template.
            e.eax = e.ebx = e.ecx = e.edx = 0
    vcpu.set_cpuid2(cpuid)
