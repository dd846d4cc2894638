"""``Kvm``: the /dev/kvm system file descriptor."""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import TYPE_CHECKING, List

from .errors import KvmError
from .ioctls import ffi, ioctl, lib

if TYPE_CHECKING:
    from .vm import Vm

KVM_PATH = "/dev/kvm"

# Host facts that never change while the host runs, read once by a warm pool.
_HOST_FACTS: dict = {}


def warm_host_facts() -> None:
    kvm = Kvm()
    _HOST_FACTS["cpuid"] = kvm.get_supported_cpuid()
    _HOST_FACTS["msrs"] = kvm.get_msr_index_list()
    kvm.close()


class Kvm:
    def __init__(self, path: str = ""):
        # STRATOVIRT_KVM_DEVICE lets tests point at a missing or inaccessible device.
        path = path or os.environ.get("STRATOVIRT_KVM_DEVICE") or KVM_PATH
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(f"open {path}", errno.ENOENT,
                           "KVM is not available on this host (is the kvm module loaded?)") from None
        except PermissionError:
            raise KvmError(f"open {path}", errno.EACCES,
                           "no permission to use KVM (add the user to the kvm group)") from None
        except OSError as e:
            raise KvmError(f"open {path}", e.errno or errno.EIO) from None
        try:
            version = ioctl(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        except KvmError as e:
            os.close(self.fd)
            raise KvmError(f"open {path}", e.errno, f"{path} is not a KVM device") from None
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError("KVM_GET_API_VERSION", errno.EINVAL,
                           f"KVM API version {version} is not the supported {lib.KVM_API_VERSION}")
        self.api_version = version
        self._mmap_size = None

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, lib.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    @property
    def vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._mmap_size = ioctl(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        return self._mmap_size

    def get_supported_cpuid(self) -> "ffi.CData":
        """``struct kvm_cpuid2 *`` with every leaf KVM can expose (treat as read-only)."""
        if "cpuid" in _HOST_FACTS:
            return _HOST_FACTS["cpuid"]
        nent = 128
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            try:
                ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
                return cpuid
            except KvmError as e:
                if e.errno != errno.E2BIG or nent >= 4096:
                    raise
                nent *= 2

    def get_msr_index_list(self) -> List[int]:
        if "msrs" in _HOST_FACTS:
            return list(_HOST_FACTS["msrs"])
        n = 512
        while True:
            lst = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            try:
                ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, lst, "KVM_GET_MSR_INDEX_LIST")
                return [lst.indices[i] for i in range(lst.nmsrs)]
            except KvmError as e:
                if e.errno != errno.E2BIG or n >= 16384:
                    raise
                n = max(n * 2, lst.nmsrs)

    def create_vm(self) -> "Vm":
        from .vm import Vm
        fd = ioctl(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
