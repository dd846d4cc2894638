import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# A stratovirt-pool on the default socket must not take the tests' VMs: those that test
# the pool name theirs in STRATOVIRT_POOL.
os.environ["STRATOVIRT_POOL"] = "off"

from vmtools import require_kvm  # noqa: E402


@pytest.fixture
def kvm() -> None:
    require_kvm()


@pytest.fixture(scope="session")
def guest_elf() -> Path:
    from stratovirt_py.guest.build import build_guest
    return build_guest("elf")


@pytest.fixture(scope="session")
def guest_bzimage() -> Path:
    from stratovirt_py.guest.build import build_guest
    return build_guest("bzimage")


@pytest.fixture
def vmdir(tmp_path: Path) -> Path:
    return tmp_path
