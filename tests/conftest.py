import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

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
