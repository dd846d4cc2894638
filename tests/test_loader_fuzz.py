"""Property test of the kernel loader: a kernel file with damaged headers is loaded or
refused with a BootError, never another exception (which would be an internal error)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratovirt_py.boot.loader import load_kernel
from stratovirt_py.errors import BootError
from stratovirt_py.memory import GuestMemory


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.anonymous(128 << 20)
    yield m
    m.close()


@pytest.fixture(scope="module", params=["elf", "bzimage"])
def image(request):
    from stratovirt_py.guest.build import build_guest
    return build_guest(request.param).read_bytes()


# Header bytes: the ELF header and program headers, or the bzImage setup header.
SPOTS = st.one_of(st.integers(0, 0x100), st.integers(0x1F0, 0x270))
VALUES = st.one_of(st.integers(0, 255), st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(SPOTS, VALUES), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 0x2000)))
def test_damaged_headers_are_loaded_or_refused(mem, image, tmp_path_factory, edits, cut):
    data = bytearray(image)
    for off, value in edits:
        data[off] = value
    if cut is not None:
        del data[cut:]
    path = tmp_path_factory.getbasetemp() / "kernel"
    path.write_bytes(bytes(data))
    try:
        load_kernel(mem, str(path))
    except BootError:
        pass


@pytest.mark.parametrize("cut", [519, 520, 0x237])
def test_found_truncated_bzimage_headers(mem, tmp_path, cut):
    """Found by the property test: struct.error (an internal error) instead of BootError."""
    from stratovirt_py.guest.build import build_guest
    path = tmp_path / "bzImage"
    path.write_bytes(build_guest("bzimage").read_bytes()[:cut])
    with pytest.raises(BootError, match="truncated"):
        load_kernel(mem, str(path))
