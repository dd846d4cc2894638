"""Fixtures for the snapshot-format tests: an isolated verification cache and small guests."""

import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _ROOT)

from stratovirt_py.memory import GuestMemory  # noqa: E402
from tplhelpers import MiB, fill  # noqa: E402


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Every test gets its own ${XDG_CACHE_HOME}."""
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture
def guest():
    """A 64 MiB anonymous guest with some data; closed afterwards."""
    mem = GuestMemory.anonymous(64 * MiB)
    fill(mem, 1)
    yield mem
    mem.close()
