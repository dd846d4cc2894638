"""Thin typed layer over /dev/kvm: ``Kvm`` -> ``Vm`` -> ``Vcpu`` (after rust-vmm's kvm-ioctls)."""

from .errors import KvmError
from .system import Kvm
from .vcpu import Vcpu
from .vm import Vm

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError"]
