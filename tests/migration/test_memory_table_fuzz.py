"""Property tests of the memory checksum table: a template's memory file checked against
the table its state holds (memfile.verify_memory, and read_template around it).

The oracle is exact: verification passes if and only if the memory file's content and
the table are those the writer produced.  A chunk's entry counts its nonzero pages and
CRCs them, so one changed byte either changes the count or is a burst CRC-32 always
finds; several changes could collide with odds of 2**-32, which a derandomized run
would show the same way every time.  Cases start from the corpus
(tests/fuzz_corpus/memtable/); see fuzz_harness.py for their format."""

import os
import shutil
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_harness import (MAX_MEMFILE, MiB, fuzz_settings, memtable_decode, memtable_encode,
                          memtable_file, run, seeds)
from stratovirt_py.errors import SnapshotError
from stratovirt_py.migration.memfile import CHUNK_SIZE, ENTRY, verify_memory

# the seeds the writer made (the others are damaged on purpose)
GOOD = [s for s in seeds("memtable")
        if memtable_decode(s)[0] and not isinstance(run("memtable", s), SnapshotError)]


def _content(size, patches):
    buf = bytearray(size)
    for off, b in patches:
        end = off + len(b)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[off:end] = b
    return bytes(buf)


@st.composite
def edits(draw, size):
    """Byte edits of a memory file: random, zeros (a hole filled, data wiped) or one flip."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        off = min(size - 1, draw(st.one_of(st.integers(0, size - 1),
                                           st.sampled_from([CHUNK_SIZE - 1, CHUNK_SIZE]))))
        kind = draw(st.sampled_from(["random", "zeros", "flip"]))
        if kind == "flip":
            out.append((off, None))
        else:
            n = draw(st.integers(1, 8192))
            out.append((off, draw(st.binary(min_size=n, max_size=n)) if kind == "random"
                        else bytes(n)))
    return out


@fuzz_settings(150)
@given(seed=st.sampled_from(GOOD), data=st.data())
def test_memory_file_edits_are_found_exactly(seed, data):
    size, table, patches = memtable_decode(seed)
    before = _content(size, patches)
    after = bytearray(before)
    new = list(patches)
    for off, b in data.draw(edits(size)):
        if b is None:
            b = bytes([after[off] ^ data.draw(st.integers(1, 255))])
        b = b[:size - off]
        after[off:off + len(b)] = b
        new.append((off, b))
    result = run("memtable", memtable_encode(size, table, new))
    if bytes(after) == before:
        assert not isinstance(result, SnapshotError), result
    else:
        first = next(c for c in range(0, size, CHUNK_SIZE)
                     if after[c:c + CHUNK_SIZE] != before[c:c + CHUNK_SIZE]) // CHUNK_SIZE
        assert isinstance(result, SnapshotError), "a changed memory file verified"
        assert f"chunk {first} " in str(result)


@fuzz_settings(100)
@given(seed=st.sampled_from(GOOD), data=st.data())
def test_table_edits_are_refused(seed, data):
    """Flipped, cut, extended or crafted entries (a data chunk called a hole, a wrong
    page count with its CRC kept): refused, naming the chunk or the table."""
    size, table, patches = memtable_decode(seed)
    t = bytearray(table)
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "entry"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(t) - 1))
        t[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "cut":
        del t[data.draw(st.integers(0, len(t) - 1)):]
    elif how == "extend":
        t += data.draw(st.binary(min_size=1, max_size=24))
    else:
        i = data.draw(st.integers(0, len(t) // ENTRY.size - 1))
        crc, count = ENTRY.unpack_from(t, i * ENTRY.size)
        crafted = data.draw(st.sampled_from([(0, 0), (crc, 0), (crc, count + 1), (0, count),
                                             (crc, 0xFFFFFFFF), (crc ^ 0x80000000, count)]))
        ENTRY.pack_into(t, i * ENTRY.size, *crafted)
    result = run("memtable", memtable_encode(size, bytes(t), patches))
    if bytes(t) == table:
        assert not isinstance(result, SnapshotError), result
    else:
        assert isinstance(result, SnapshotError)
        assert "checksum table" in str(result) or "chunk" in str(result)


@fuzz_settings(40)
@given(seed=st.sampled_from(GOOD), delta=st.one_of(st.integers(-3 * MiB, 3 * MiB),
                                                   st.sampled_from([-1, 1, 4096])))
def test_a_resized_memory_file_is_refused(seed, delta):
    size, table, patches = memtable_decode(seed)
    if delta == 0 or size + delta < 0:
        return
    path_size = size + delta
    grow = [(path_size - 1, b"\0")] if delta > 0 else []
    # the file is cut or extended; the table and the size the state gives stay
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "memory")
        memtable_file(path, path_size, [p for p in patches if p[0] < path_size] + grow)
        with pytest.raises(SnapshotError, match="truncated" if delta < 0 else "has"):
            verify_memory(path, size, table)


def test_the_clamp_keeps_cases_small():
    huge = memtable_encode(1 << 62, b"", [])
    assert memtable_decode(huge)[0] == MAX_MEMFILE


# -- the table as read_template takes it from the state, checksums recomputed -----------------

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from stratovirt_py.memory import GuestMemory
    from stratovirt_py.migration.format import write_template
    from test_template_cli import RESTORABLE
    d = tmp_path_factory.mktemp("memtable") / "tpl"
    mem = GuestMemory.anonymous(6 * MiB)
    try:
        mem.write(0x5000, b"data in chunk 0")
        mem.write(2 * MiB + 17, b"and in chunk 1")
        write_template(str(d), {"kvm_api_version": 12}, RESTORABLE, mem, stamp=False)
    finally:
        mem.close()
    return d


@fuzz_settings(60)
@given(data=st.data())
def test_a_crafted_table_in_the_state_is_refused(template, tmp_path_factory, data):
    """The table's bytes or its place in the state changed and the state's checksum
    recomputed (anyone who can write a template can): read without verification it
    may pass, but a full verification refuses whatever is not the written table."""
    from stratovirt_py.migration.format import read_template
    from tplhelpers import rewrite_state
    d = tmp_path_factory.getbasetemp() / "memtable-case"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(template, d, symlinks=True)
    os.chmod(os.path.realpath(d / "state"), 0o600)
    seen = {}

    def mutate(header, area):
        mem = header["memory"]
        off, n = mem["table_offset"], mem["table_length"]
        seen["table"] = bytes(area[off:off + n])
        if data.draw(st.booleans()):
            i = data.draw(st.integers(off, off + n - 1))
            area[i] = data.draw(st.integers(0, 255))
        else:     # the table read from another place of the state, same length
            mem["table_offset"] = data.draw(st.integers(0, len(area) - n))
        seen["new"] = bytes(area[mem["table_offset"]:mem["table_offset"] + n])
    rewrite_state(d, mutate=mutate)
    try:
        read_template(str(d), verify=False, check_host=False)
    except SnapshotError:
        pass
    try:
        read_template(str(d), verify="full", check_host=False, stamp_later=True)
    except SnapshotError as e:
        assert "\n" not in str(e)
        assert seen["new"] != seen["table"], e
    else:
        assert seen["new"] == seen["table"]
