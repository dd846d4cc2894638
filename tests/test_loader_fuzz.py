"""Property tests of the kernel and initrd loader: a kernel file with damaged headers, or
an initrd of any size against any kernel end and highest address, is loaded correctly or
refused with a BootError, never another exception (which would be an internal error)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_harness import INITRD_HEAD, INITRD_RAM, fuzz_settings, run, seeds
from stratovirt_py.boot.loader import load_kernel
from stratovirt_py.errors import BootError
from stratovirt_py.memory import PAGE_SIZE, GuestMemory


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


@fuzz_settings(300)
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


# -- the initrd: its size against the kernel's end, the highest address and RAM --------------
INITRD_SIZES = st.one_of(st.integers(0, 2 * PAGE_SIZE + 1),
                         st.sampled_from([PAGE_SIZE - 1, INITRD_RAM - PAGE_SIZE, INITRD_RAM,
                                          INITRD_RAM + 1]))
ADDRS = st.one_of(st.integers(0, INITRD_RAM + PAGE_SIZE),
                  st.sampled_from([0, 1, PAGE_SIZE - 1, INITRD_RAM - 1, 1 << 63, (1 << 64) - 1]))


@fuzz_settings(120)
@given(size=INITRD_SIZES, kernel_end=ADDRS, addr_max=ADDRS, fill=st.integers(0, 255),
       seed=st.sampled_from(seeds("initrd")))
def test_initrd_is_placed_or_refused(size, kernel_end, addr_max, fill, seed):
    """Placed page-aligned above the kernel, below the limit and in RAM, byte for byte
    (fuzz_harness checks that), or refused with a BootError that names the file."""
    payload = (seed[INITRD_HEAD.size:] + bytes([fill]) * size)[:size]
    result = run("initrd", INITRD_HEAD.pack(kernel_end, addr_max) + payload)
    if isinstance(result, BootError):
        assert "initrd file" in str(result)
        fits = min(INITRD_RAM, addr_max) - size & ~(PAGE_SIZE - 1)
        assert not payload or size > INITRD_RAM or fits < kernel_end, (result, fits)
