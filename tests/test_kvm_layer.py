"""The thin KVM layer: capabilities checked before a VM exists, and kvm/ as the only
place that names KVM's numbers."""

import errno
import os
import re
from pathlib import Path

import pytest

from stratovirt_py.kvm import KvmError, system
from stratovirt_py.kvm.ioctls import lib

PACKAGE = Path(system.__file__).resolve().parent.parent


def test_a_missing_capability_is_named(kvm, monkeypatch):
    k = system.Kvm()
    try:
        monkeypatch.setitem(system._HOST_FACTS, "caps_ok", False)
        real = system.Kvm.check_extension
        monkeypatch.setattr(system.Kvm, "check_extension",
                            lambda self, cap: 0 if cap == lib.KVM_CAP_IRQFD else real(self, cap))
        with pytest.raises(KvmError) as e:
            k.create_vm()
        assert "lacks KVM_CAP_IRQFD" in str(e.value) and "virtio interrupts" in str(e.value)
        assert e.value.errno == errno.ENOSYS
    finally:
        k.close()


def test_this_host_has_every_required_capability(kvm, monkeypatch):
    monkeypatch.setitem(system._HOST_FACTS, "caps_ok", False)
    k = system.Kvm()
    try:
        k.check_required_caps()
        assert system._HOST_FACTS["caps_ok"]
    finally:
        k.close()


def test_only_kvm_names_kvm_numbers():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "kvm":
            continue
        text = path.read_text()
        if re.search(r"\blib\.KVM_|kvm\.ioctls import|from \.ioctls import", text):
            offenders.append(str(rel))
    assert not offenders, f"outside kvm/: {offenders}"

