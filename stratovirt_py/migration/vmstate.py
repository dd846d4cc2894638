"""Save and restore what KVM holds: every vCPU's registers and the VM's irqchip, PIT, clock.

KVM's own structs are kept as opaque byte blobs in the host kernel's layout, so
nothing is lost in translation; the header's architecture/vendor checks keep a
template on a host that shares that layout.  Restore applies state in the order
KVM needs: CPUID (already set when the vCPU was created), MP state, registers,
sregs (which carry APIC base and mode) before the LAPIC, the LAPIC before MSRs,
IA32_TSC before IA32_TSC_DEADLINE, vCPU events last.
"""

from __future__ import annotations

from ..logs import get_logger
from ..record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import ClassVar, List, Sequence, Tuple

from ..errors import U32, U64, SnapshotError, check_fields, check_value, field_error
from ..kvm import Kvm, KvmError, Vcpu, Vm

log = get_logger(__name__)

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
# MSRs KVM lists but whose saved value must not be written back blindly.
SKIP_MSRS = {0x3B}   # IA32_TSC_ADJUST follows from IA32_TSC

VCPU_BLOBS = ("regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "fpu", "mp_state")


@record(frozen=True)
class VcpuState:
    VERSION: ClassVar[int] = 1
    index: int
    mp_state: bytes
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    msrs: List[Tuple[int, int]]
    vcpu_events: bytes
    tsc_khz: int

    # KVM checks each blob's exact size; the bound only keeps a crafted one cheap.
    FIELDS: ClassVar[dict] = {
        "index": ("int", 0, 1023), **{name: ("bytes", 1 << 20) for name in VCPU_BLOBS},
        "msrs": ("list", 4096), "vcpu_events": ("bytes", 1 << 20), "tsc_khz": ("int", 0, U32)}

    @classmethod
    def check(cls, section: str, data: dict, i: int) -> None:
        prefix = f"[{i}]."
        check_fields(section, data, cls.FIELDS, prefix)
        if all(type(m) is tuple and len(m) == 2 and type(m[0]) is int and type(m[1]) is int
               and 0 <= m[0] <= U32 and 0 <= m[1] <= U64 for m in data["msrs"]):
            return              # the common case in one pass; else find the culprit
        for n, msr in enumerate(data["msrs"]):
            where = f"{prefix}msrs[{n}]"
            if not isinstance(msr, (list, tuple)) or len(msr) != 2:
                raise field_error(section, where, "is not an (index, value) pair")
            check_value(section, where + "[0]", msr[0], ("int", 0, U32))
            check_value(section, where + "[1]", msr[1], ("int", 0, U64))


@record(frozen=True)
class VmState:
    VERSION: ClassVar[int] = 1
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: int

    FIELDS: ClassVar[dict] = {"pic_master": ("bytes", 1 << 16), "pic_slave": ("bytes", 1 << 16),
                              "ioapic": ("bytes", 1 << 16), "pit": ("bytes", 1 << 16),
                              "clock": ("int", 0, U64)}


def saveable_msrs(kvm: Kvm, vcpu: Vcpu) -> List[int]:
    """KVM's list of MSRs to migrate, less those this vCPU cannot read, TSC first."""
    # KVM_GET_MSRS reads in order and stops at the first MSR it cannot read: read the
    # rest in one go, skipping each unreadable one (one call per unreadable MSR, not
    # one per MSR: a first snapshot used to spend milliseconds here).
    todo = [index for index in kvm.get_msr_index_list() if index not in SKIP_MSRS]
    readable: List[int] = []
    while todo:
        try:
            got = len(vcpu.get_msrs(todo))
        except KvmError:
            got = 0
        readable.extend(todo[:got])
        todo = todo[got + 1:]       # todo[got] is unreadable
    # TSC before TSC_DEADLINE: the deadline is relative to the TSC being restored.
    readable.sort(key=lambda i: (i != MSR_IA32_TSC, i == MSR_IA32_TSC_DEADLINE, i))
    return readable


def save_vcpu(vcpu: Vcpu, msr_indices: Sequence[int]) -> VcpuState:
    blobs = {name: vcpu.get_blob(name) for name in
             ("mp_state", "regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "lapic")}
    msrs = vcpu.get_msrs(msr_indices)
    try:
        tsc_khz = vcpu.get_tsc_khz()
    except KvmError:
        tsc_khz = 0
    # vCPU events last: reading MSRs can leave exception state to report.
    events = vcpu.get_blob("vcpu_events")
    return VcpuState(index=vcpu.index, msrs=[(i, v) for i, v in msrs], vcpu_events=events,
                     tsc_khz=tsc_khz, **blobs)


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    if state.index != vcpu.index:
        raise SnapshotError(f"vCPU state {state.index} given to vCPU {vcpu.index}")
    try:
        vcpu.set_blob("mp_state", state.mp_state)
        vcpu.set_blob("regs", state.regs)
        vcpu.set_blob("sregs", state.sregs)
        vcpu.set_blob("fpu", state.fpu)
        vcpu.set_blob("xsave", state.xsave)
        vcpu.set_blob("xcrs", state.xcrs)
        vcpu.set_blob("debugregs", state.debugregs)
        vcpu.set_blob("lapic", state.lapic)
        msrs = [(i, v) for i, v in state.msrs if i not in SKIP_MSRS]
        _set_msrs_tolerant(vcpu, msrs)
        vcpu.set_blob("vcpu_events", state.vcpu_events)
    except KvmError as e:
        raise SnapshotError(f"cannot restore vCPU {vcpu.index}: {e}") from None


def _set_msrs_tolerant(vcpu: Vcpu, msrs: List[Tuple[int, int]]) -> None:
    """All at once; if KVM refuses one, one by one in the same order, skipping refusals."""
    try:
        vcpu.set_msrs(msrs)
        return
    except KvmError:
        pass
    for entry in msrs:
        try:
            vcpu.set_msrs([entry])
        except KvmError:
            log.warning("vCPU %d: MSR %#x not restored", vcpu.index, entry[0])


def save_vm(vm: Vm) -> VmState:
    return VmState(pic_master=vm.get_irqchip("pic-master"), pic_slave=vm.get_irqchip("pic-slave"),
                   ioapic=vm.get_irqchip("ioapic"), pit=vm.get_pit2(), clock=vm.get_clock())


def restore_vm(vm: Vm, state: VmState) -> None:
    try:
        vm.set_irqchip(state.pic_master)
        vm.set_irqchip(state.pic_slave)
        vm.set_irqchip(state.ioapic)
        vm.set_pit2(state.pit)
        # kvmclock continues from the moment of the snapshot: guest time never runs backwards.
        vm.set_clock(state.clock)
    except KvmError as e:
        raise SnapshotError(f"cannot restore the VM's interrupt controllers and clock: {e}") from None
