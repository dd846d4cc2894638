"""``Vcpu``: a KVM vCPU file descriptor and its shared ``kvm_run`` page."""

from __future__ import annotations

import errno
import mmap
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import TYPE_CHECKING, Dict, Iterable, List, Tuple

from .errors import KvmError
from .ioctls import ffi, ioctl, ioctl_ret, lib

if TYPE_CHECKING:
    from .vm import Vm

# Opaque per-vCPU state blobs: name -> (struct type, get ioctl, set ioctl).  Their
# contents are the host kernel's struct layout, saved and restored byte for byte.
_BLOBS: Dict[str, Tuple[str, str, str]] = {
    "regs": ("struct kvm_regs *", "KVM_GET_REGS", "KVM_SET_REGS"),
    "sregs": ("struct kvm_sregs *", "KVM_GET_SREGS", "KVM_SET_SREGS"),
    "fpu": ("struct kvm_fpu *", "KVM_GET_FPU", "KVM_SET_FPU"),
    "lapic": ("struct kvm_lapic_state *", "KVM_GET_LAPIC", "KVM_SET_LAPIC"),
    "xsave": ("struct kvm_xsave *", "KVM_GET_XSAVE", "KVM_SET_XSAVE"),
    "xcrs": ("struct kvm_xcrs *", "KVM_GET_XCRS", "KVM_SET_XCRS"),
    "vcpu_events": ("struct kvm_vcpu_events *", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS"),
    "mp_state": ("struct kvm_mp_state *", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE"),
    "debugregs": ("struct kvm_debugregs *", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS"),
}


class Vcpu:
    def __init__(self, vm: "Vm", fd: int, index: int):
        self.vm = vm
        self.fd = fd
        self.index = index
        size = vm.kvm.vcpu_mmap_size
        self.run_mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_buf = memoryview(self.run_mmap)
        self.run = ffi.from_buffer("struct kvm_run *", self.run_mmap)
        exit_ptr = ffi.cast("char *", self.run) + lib.SV_RUN_EXIT_OFFSET
        self.exit_io = ffi.cast("struct sv_exit_io *", exit_ptr)
        self.exit_mmio = ffi.cast("struct sv_exit_mmio *", exit_ptr)
        self.exit_system_event = ffi.cast("struct sv_exit_system_event *", exit_ptr)
        self.exit_internal = ffi.cast("struct sv_exit_internal *", exit_ptr)
        self.exit_fail_entry = ffi.cast("struct sv_exit_fail_entry *", exit_ptr)

    def run_once(self) -> int:
        """KVM_RUN; returns 0 on an exit to handle or an errno (EINTR, EAGAIN)."""
        ret, err = ioctl_ret(self.fd, lib.KVM_RUN, 0)
        if ret < 0:
            if err in (errno.EINTR, errno.EAGAIN):
                return err
            raise KvmError("KVM_RUN", err)
        return 0

    def set_immediate_exit(self, value: bool) -> None:
        self.run.immediate_exit = 1 if value else 0

    # -- registers --------------------------------------------------------------------
    def get(self, name: str):
        ctype, get_op, _ = _BLOBS[name]
        p = ffi.new(ctype)
        ioctl(self.fd, getattr(lib, get_op), p, get_op)
        return p

    def set(self, name: str, p) -> None:
        _, _, set_op = _BLOBS[name]
        ioctl(self.fd, getattr(lib, set_op), p, set_op)

    def get_blob(self, name: str) -> bytes:
        return bytes(ffi.buffer(self.get(name)))

    def set_blob(self, name: str, data: bytes) -> None:
        ctype, _, set_op = _BLOBS[name]
        p = ffi.new(ctype)
        size = ffi.sizeof(p[0])
        if len(data) != size:
            raise KvmError(set_op, errno.EINVAL,
                           f"saved {name} is {len(data)} bytes, this host's KVM expects {size}")
        ffi.memmove(p, data, size)
        self.set(name, p)

    def set_cpuid2(self, cpuid) -> None:
        ioctl(self.fd, lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_msrs(self, indices: Iterable[int]) -> List[Tuple[int, int]]:
        idx = list(indices)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(idx), "entries": len(idx)})
        for i, index in enumerate(idx):
            msrs.entries[i].index = index
        n = ioctl(self.fd, lib.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        return [(msrs.entries[i].index, msrs.entries[i].data) for i in range(n)]

    def set_msrs(self, entries: Iterable[Tuple[int, int]]) -> int:
        ents = list(entries)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(ents), "entries": len(ents)})
        for i, (index, data) in enumerate(ents):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        n = ioctl(self.fd, lib.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if n != len(ents):
            bad = ents[n][0]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} was refused")
        return n

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, lib.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def close(self) -> None:
        try:
            self.run_buf.release()
            self.run_mmap.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
