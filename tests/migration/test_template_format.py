"""Template write/read/verify: round trip, sparseness, refusals, atomicity, cache."""

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
import threading
import time

import pytest

from tplhelpers import MiB, memory_bytes, rewrite_state
from stratovirt_py.errors import SnapshotError
from stratovirt_py.memory import GuestMemory
from stratovirt_py.migration import format as fmt
from stratovirt_py.migration import memfile, vcache, writer
from stratovirt_py.migration.format import (
    SnapshotCancelled, read_template, verify_template, write_template)

SECTIONS = {
    "cpu": (2, [{"regs": (1, 2, 3), "xsave": bytes(range(256)) * 16, "lapic": b"\x00" * 1024,
                 "msrs": [[0x10, 123456789], [0xC0000080, 0xD01]]}]),
    "vm": (1, {"clock": 123456, "irqchip": {"pic": b"\x01\x02", "ioapic": None}}),
    "config": (1, {"mem_size": 64 * MiB, "nr_cpus": 1,
                   "devices": [{"type": "virtio-blk-device", "id": "rootfs", "serial": None},
                               {"type": "virtio-net-device", "id": "net0",
                                "mac": "52:54:00:12:34:56"}]}),
}
HEADER = {"kvm_api_version": 12}


def write(d, mem, sections=SECTIONS, header=HEADER, **kw):
    return write_template(str(d), header, sections, mem, **kw)


def listing(d):
    return sorted(os.listdir(d))


def gen_files(d):
    return sorted(os.listdir(os.path.join(d, "current")))


def settle():
    """Let coarse file timestamps move on, so that stamps can be recorded."""
    time.sleep(vcache.racy_margin() + 0.01)


# -- round trip ----------------------------------------------------------------------

def test_roundtrip_state_and_memory(tmp_path, guest):
    d = tmp_path / "tpl"
    rep = write(d, guest, header={"kvm_api_version": 12, "label": "base"})
    t = read_template(str(d), verify="full")
    assert t.sections == SECTIONS
    assert type(t.sections["cpu"][1][0]["regs"]) is tuple
    assert t.mem_size == guest.size == 64 * MiB
    assert t.header["arch"] == "x86_64" or t.header["arch"] == fmt.host_arch()
    assert t.header["cpu_vendor"] == fmt.host_cpu_vendor()
    assert t.header["kvm_api_version"] == 12
    assert t.header["vmm_version"]
    assert t.header["template_id"] == rep.template_id == t.template_id
    assert t.header["extra"] == {"label": "base"}
    assert t.verified == "full"
    assert t.section("vm", supported_version=1) == SECTIONS["vm"][1]
    want = memory_bytes(guest)
    for mapped in (True, False):
        m = GuestMemory.from_file(t.memory_path, t.mem_size, mapped=mapped)
        assert memory_bytes(m) == want
        m.close()
    # the compatibility names exist too
    assert os.path.realpath(d / "memory") == os.path.realpath(t.memory_path)
    assert open(d / "state", "rb").read(8) == fmt.MAGIC


def test_memory_file_is_sparse(tmp_path, guest):
    d = tmp_path / "tpl"
    rep = write(d, guest)
    st = os.stat(d / "memory")
    assert st.st_size == 64 * MiB
    # 3 MiB dense + 40 pages + last page; allow some filesystem slack
    assert rep.data_bytes <= 3 * MiB + 42 * 4096
    assert st.st_blocks * 512 < 5 * MiB


def test_two_region_layout_above_4g(tmp_path):
    size = 3 * 1024 * MiB + 8 * MiB  # RAM continues at 4 GiB
    mem = GuestMemory.anonymous(size)
    try:
        mem.write(0x1000, b"low")
        mem.write(0xBFFF_F000, b"below the gap")
        mem.write(0x1_0000_0000, b"above the gap")
        mem.write(0x1_0000_0000 + 8 * MiB - 3, b"end")
        d = tmp_path / "tpl"
        write(d, mem)
        t = read_template(str(d), verify="full")
        assert t.regions == [(0, 0xC000_0000, 0), (0x1_0000_0000, 8 * MiB, 0xC000_0000)]
        m = GuestMemory.from_file(t.memory_path, size, mapped=True)
        assert m.read(0x1_0000_0000, 13) == b"above the gap"
        assert m.read(0xBFFF_F000, 13) == b"below the gap"
        assert m.read(0x1_0000_0000 + 8 * MiB - 3, 3) == b"end"
        m.close()
        assert os.stat(t.memory_path).st_blocks * 512 < MiB
    finally:
        mem.close()


def test_size_not_a_page_multiple(tmp_path):
    mem = GuestMemory.anonymous(4 * MiB + 1000)
    try:
        mem.write(4 * MiB + 999, b"\x7f")
        d = tmp_path / "tpl"
        write(d, mem)
        t = read_template(str(d), verify="full")
        m = GuestMemory.from_file(t.memory_path, t.mem_size, mapped=False)
        assert memory_bytes(m) == memory_bytes(mem)
        m.close()
    finally:
        mem.close()


def test_all_zero_guest(tmp_path):
    mem = GuestMemory.anonymous(8 * MiB)
    try:
        d = tmp_path / "tpl"
        rep = write(d, mem)
        assert rep.data_bytes == 0
        t = read_template(str(d), verify="full")
        assert t.zero_chunks() == 4
        assert os.stat(t.memory_path).st_blocks == 0
    finally:
        mem.close()


def test_file_backed_guest_is_read_not_assumed_zero(tmp_path, guest):
    """A guest restored from a template (MAP_PRIVATE file) snapshots its file's content too."""
    a = tmp_path / "a"
    write(a, guest)
    t = read_template(str(a))
    restored = GuestMemory.from_file(t.memory_path, t.mem_size, mapped=True)
    try:
        restored.write(0x2000, b"after restore")
        b = tmp_path / "b"
        write(b, restored)
        tb = read_template(str(b), verify="full")
        m = GuestMemory.from_file(tb.memory_path, tb.mem_size, mapped=False)
        assert memory_bytes(m) == memory_bytes(restored)
        m.close()
    finally:
        restored.close()


def test_rewrite_in_place_and_old_generation_removed(tmp_path, guest):
    d = tmp_path / "tpl"
    a = write(d, guest)
    t_a = read_template(str(d))
    mapped = GuestMemory.from_file(t_a.memory_path, t_a.mem_size)  # a VM running from A
    guest.write(0x3000, b"second")
    b = write(d, guest)
    assert a.template_id != b.template_id
    assert read_template(str(d), verify="full").template_id == b.template_id
    assert listing(d) == [".lock", "current", "gen-" + b.template_id, "memory", "state"]
    assert mapped.read(0x3000, 6) != b"second"  # A's pages are still A's
    mapped.close()


def test_progress_phases(tmp_path, guest):
    seen = []
    write(tmp_path / "tpl", guest, progress=lambda phase, done, total: seen.append((phase, done, total)))
    phases = [p for p, _, _ in seen]
    assert phases[0] == "memory" and phases[-1] == "done"
    mem = [(d, t) for p, d, t in seen if p == "memory"]
    assert mem[-1] == (64 * MiB, 64 * MiB)
    assert [d for d, _ in mem] == sorted(d for d, _ in mem)
    assert phases.index("commit") > phases.index("state") > phases.index("sync")


def test_plain_files_directory_reads_and_is_replaced(tmp_path, guest):
    src = tmp_path / "src"
    write(src, guest)
    d = tmp_path / "copy"
    d.mkdir()
    shutil.copyfile(src / "state", d / "state")  # like cp -rL
    shutil.copyfile(src / "memory", d / "memory")
    t = read_template(str(d), verify="full")
    assert t.sections == SECTIONS
    rep = write(d, guest)
    assert os.path.islink(d / "state") and os.path.islink(d / "memory")
    assert read_template(str(d), verify="full").template_id == rep.template_id


# -- refusals ------------------------------------------------------------------------

@pytest.fixture
def tpl(tmp_path, guest):
    d = tmp_path / "tpl"
    write(d, guest)
    return d


def expect(d, match, **kw):
    with pytest.raises(SnapshotError, match=match) as ei:
        read_template(str(d), **kw)
    return str(ei.value)


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_missing_directory(tmp_path):
    expect(tmp_path / "nope", "does not exist")


@pytest.mark.parametrize("name", ["state", "memory"])
def test_missing_file(tpl, name):
    os.unlink(os.path.realpath(tpl / name))
    msg = expect(tpl, f"no {name} file")
    assert str(tpl) in msg


def test_missing_generation(tpl):
    shutil.rmtree(os.path.realpath(tpl / "current"))
    expect(tpl, "incomplete")


def test_bad_magic(tpl):
    path = os.path.realpath(tpl / "state")
    with open(path, "r+b") as f:
        f.write(b"QEVM")
    expect(tpl, "bad magic")


def test_not_a_template_at_all(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "state").write_text('{"hello": "world"}')
    (d / "memory").write_bytes(b"")
    expect(d, "bad magic")


@pytest.mark.parametrize("where", ["preamble-length", "header", "section", "table", "trailer"])
def test_flipped_byte_in_state(tpl, where):
    path = os.path.realpath(tpl / "state")
    blob = open(path, "rb").read()
    _, _, hlen, total, _ = fmt.PREAMBLE.unpack_from(blob)
    offset = {"preamble-length": 24, "header": fmt.PREAMBLE.size + 5,
              "section": fmt.PREAMBLE.size + hlen + 3, "table": total - 32 - 5,
              "trailer": total - 1}[where]
    flip(path, offset)
    expect(tpl, "corrupt")


@pytest.mark.parametrize("keep", [0, 5, 20, 100, -1])
def test_truncated_state(tpl, keep):
    path = os.path.realpath(tpl / "state")
    size = os.path.getsize(path)
    os.truncate(path, keep if keep >= 0 else size - 1)
    expect(tpl, "truncated")


def test_trailing_garbage_in_state(tpl):
    with open(os.path.realpath(tpl / "state"), "ab") as f:
        f.write(b"x")
    expect(tpl, "corrupt")


def test_newer_format_version(tpl):
    rewrite_state(tpl, version=fmt.FORMAT_VERSION + 1)
    msg = expect(tpl, "format version 2, newer than")
    assert "(1)" in msg


def test_wrong_architecture(tmp_path, guest):
    d = tmp_path / "tpl"
    write(d, guest, header={"kvm_api_version": 12, "arch": "aarch64"})
    expect(d, "created on aarch64; this host is")
    assert read_template(str(d), check_host=False).header["arch"] == "aarch64"


def test_different_cpu_vendor(tmp_path, guest):
    other = "AuthenticAMD" if fmt.host_cpu_vendor() != "AuthenticAMD" else "GenuineIntel"
    d = tmp_path / "tpl"
    write(d, guest, header={"kvm_api_version": 12, "cpu_vendor": other})
    expect(d, f"created on a {other} CPU")


def test_kvm_api_version_mismatch(tpl):
    expect(tpl, "KVM API version 12", kvm_api_version=13)
    read_template(str(tpl), kvm_api_version=12)


def test_mem_size_mismatch_before_data_pass(tpl, monkeypatch):
    monkeypatch.setattr(memfile, "verify_memory", None)  # must not get that far
    expect(tpl, "has 67108864 bytes of memory .64 MiB., this VM 134217728 .128 MiB.: -m must not change",
           verify="full", mem_size=128 * MiB)


def test_newer_section_version(tpl):
    msg = expect(tpl, "section 'cpu' has version 2, newer than",
                 supported={"cpu": 1, "vm": 1, "config": 1})
    assert "(1)" in msg
    t = read_template(str(tpl), supported={"cpu": 2, "vm": 5, "config": 1})  # older is fine
    with pytest.raises(SnapshotError, match="section 'cpu' has version 2"):
        t.section("cpu", supported_version=1)
    with pytest.raises(SnapshotError, match="no 'net0' section"):
        t.section("net0")


def test_unknown_section(tpl):
    expect(tpl, "section 'config' .* does not know", supported={"cpu": 2, "vm": 1})


def test_unknown_section_encoding(tpl):
    def mutate(h):
        h["sections"][0]["encoding"] = "cbor-9"
    rewrite_state(tpl, mutate)
    expect(tpl, "section 'cpu' uses encoding 'cbor-9'")


def test_section_out_of_bounds(tpl):
    def mutate(h):
        h["sections"][1]["length"] = 10 ** 9
    rewrite_state(tpl, mutate)
    expect(tpl, "corrupt: section entry 1 lies outside")


def test_missing_header_field(tpl):
    rewrite_state(tpl, lambda h: h.pop("memory"))
    expect(tpl, "corrupt: header lacks 'memory'")


def test_memory_size_mismatch(tpl):
    with open(os.path.realpath(tpl / "memory"), "ab") as f:
        f.write(b"\0" * 4096)
    expect(tpl, r"has 67112960 bytes, but the state describes 67108864")


def test_memory_size_in_state_changed(tpl):
    def mutate(h):
        h["memory"]["size"] = 32 * MiB
        h["memory"]["regions"][0]["size"] = 32 * MiB
        h["memory"]["table_length"] = 16 * 8
    rewrite_state(tpl, mutate)
    expect(tpl, "has 67108864 bytes, but the state describes 33554432")


def test_truncated_memory(tpl):
    os.truncate(os.path.realpath(tpl / "memory"), 64 * MiB - 4096)
    expect(tpl, "truncated")


def test_flipped_byte_in_memory_data(tpl):
    flip(os.path.realpath(tpl / "memory"), 5 * MiB + 4096 * 3 + 12345)  # inside the dense run
    msg = expect(tpl, "corrupt: chunk 2 ")  # the cache does not hide it (ctime changed)
    assert "checksum" in msg


def test_byte_written_into_a_hole(tpl):
    flip(os.path.realpath(tpl / "memory"), 40 * MiB + 7)
    expect(tpl, "corrupt: chunk 20 ")


def test_hole_filled_with_zeros_still_verifies(tpl):
    """Checksums describe content, not the hole layout (e.g. a copy that filled holes)."""
    path = os.path.realpath(tpl / "memory")
    with open(path, "r+b") as f:
        f.seek(30 * MiB)
        f.write(b"\0" * (2 * MiB))
    read_template(str(tpl), verify="full")


def test_verify_false_skips_data_but_checks_sizes(tpl):
    flip(os.path.realpath(tpl / "memory"), 5 * MiB + 4096 * 3)
    assert read_template(str(tpl), verify=False).verified == "no"
    os.truncate(os.path.realpath(tpl / "memory"), MiB)
    expect(tpl, "truncated", verify=False)


def test_verify_template_reports(tpl):
    r = verify_template(str(tpl))
    assert r.mem_size == 64 * MiB
    assert 0 < r.bytes_read < 8 * MiB  # holes are not read
    assert r.data_chunks >= 2


# -- atomicity -------------------------------------------------------------------------

@contextlib.contextmanager
def fail_after(name, n, exc):
    """Make os.<name> raise ``exc`` after ``n`` successful calls, inside the block."""
    real = getattr(os, name)
    calls = {"n": 0}

    def fake(*a, **kw):
        calls["n"] += 1
        if calls["n"] > n:
            raise exc
        return real(*a, **kw)
    with pytest.MonkeyPatch.context() as mp:  # not `monkeypatch`: its undo() would drop XDG_CACHE_HOME
        mp.setattr(os, name, fake)
        yield calls


def check_previous_intact(d, template_id, before):
    assert listing(d) == before
    t = read_template(str(d), verify="full")
    assert t.template_id == template_id
    assert t.sections == SECTIONS
    verify_template(str(d))


@pytest.mark.parametrize("n", [0, 3, 20])
def test_enospc_in_memory_write_keeps_previous(tmp_path, guest, n):
    d = tmp_path / "tpl"
    a = write(d, guest)
    before = listing(d)
    guest.write(0, b"changed")
    with fail_after("pwrite", n, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
        with pytest.raises(SnapshotError, match="No space left on device"):
            write(d, guest)
    check_previous_intact(d, a.template_id, before)


@pytest.mark.parametrize("call", ["write", "fsync", "symlink", "replace"])
def test_failure_in_state_write_or_commit_keeps_previous(tmp_path, guest, call):
    d = tmp_path / "tpl"
    a = write(d, guest)
    before = listing(d)
    n = {"write": 0, "fsync": 1, "symlink": 0, "replace": 0}[call]
    with fail_after(call, n, OSError(errno.EIO, os.strerror(errno.EIO))):
        with pytest.raises(SnapshotError, match="Input/output error"):
            write(d, guest)
    check_previous_intact(d, a.template_id, before)


def test_first_write_failure_leaves_nothing_readable(tmp_path, guest):
    d = tmp_path / "tpl"
    with fail_after("pwrite", 2, OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(SnapshotError):
            write(d, guest)
    assert listing(d) == [".lock"]
    expect(d, "no state file")


def test_cancel_keeps_previous(tmp_path, guest):
    d = tmp_path / "tpl"
    a = write(d, guest)
    before = listing(d)
    cancel = threading.Event()

    def progress(phase, done, total):
        if phase == "memory" and done >= 16 * MiB:
            cancel.set()
    with pytest.raises(SnapshotCancelled, match="cancelled"):
        write(d, guest, cancel=cancel, progress=progress)
    check_previous_intact(d, a.template_id, before)
    cancel2 = threading.Event()
    cancel2.set()
    with pytest.raises(SnapshotCancelled):
        write(d, guest, cancel=cancel2)
    check_previous_intact(d, a.template_id, before)


def test_interrupt_cleans_up(tmp_path, guest):
    d = tmp_path / "tpl"
    a = write(d, guest)
    before = listing(d)

    def progress(phase, done, total):
        if phase == "state":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write(d, guest, progress=progress)
    check_previous_intact(d, a.template_id, before)


def test_crash_leftovers_are_ignored_then_removed(tmp_path, guest):
    d = tmp_path / "tpl"
    a = write(d, guest)
    before = listing(d)
    # a "crash": the writer dies without cleaning up
    with pytest.MonkeyPatch.context() as mp, fail_after("replace", 0, OSError(errno.EIO, "crash")):
        mp.setattr(writer, "_remove", lambda path: None)
        with pytest.raises(SnapshotError):
            write(d, guest)
    assert len(listing(d)) == len(before) + 2  # a generation and a temporary symlink
    check_previous_intact(d, a.template_id, listing(d))
    c = write(d, guest)
    assert listing(d) == [".lock", "current", "gen-" + c.template_id, "memory", "state"]


def test_concurrent_writer_refused(tmp_path, guest):
    d = tmp_path / "tpl"
    a = write(d, guest)
    fd = os.open(d / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(SnapshotError, match="another snapshot is being written"):
            write(d, guest)
    finally:
        os.close(fd)
    assert read_template(str(d)).template_id == a.template_id


def test_real_full_disk_on_tmpfs(tmp_path):
    """ENOSPC from a real filesystem: a 4 MiB tmpfs (needs root; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    mem = GuestMemory.anonymous(16 * MiB)
    try:
        d = mnt / "tpl"
        mem.write(0, os.urandom(MiB))
        a = write(d, mem)
        before = listing(d)
        mem.write(4 * MiB, os.urandom(6 * MiB))  # 7 MiB of data does not fit next to 1 MiB
        with pytest.raises(SnapshotError, match="No space left on device"):
            write(d, mem)
        check_previous_intact_plain(d, a.template_id, before)
    finally:
        mem.close()
        subprocess.run(["umount", str(mnt)], check=False)


def check_previous_intact_plain(d, template_id, before):
    assert listing(d) == before
    assert read_template(str(d), verify="full").template_id == template_id


# -- verification cache -----------------------------------------------------------------

def count_reads(monkeypatch):
    real = os.preadv
    n = {"reads": 0}

    def counting(*a, **kw):
        n["reads"] += 1
        return real(*a, **kw)
    monkeypatch.setattr(os, "preadv", counting)
    return n


def test_cache_skips_second_data_pass(tmp_path, guest, monkeypatch, cache_home):
    d = tmp_path / "tpl"
    write(d, guest, stamp=False)
    settle()
    n = count_reads(monkeypatch)
    assert read_template(str(d)).verified == "full"
    first = n["reads"]
    assert first > 0
    assert len(os.listdir(cache_home / "stratovirt-py" / "verified")) == 1
    t = read_template(str(d))
    assert t.verified == "cache" and n["reads"] == first  # no data read
    # any modification (even writing the same byte back) invalidates the stamp
    path = os.path.realpath(d / "memory")
    flip(path, 5 * MiB + 4096 * 3)
    flip(path, 5 * MiB + 4096 * 3)
    assert read_template(str(d)).verified == "full"
    assert n["reads"] > first
    settle()
    flip(path, 5 * MiB + 4096 * 3)  # now really corrupt
    expect(d, "corrupt: chunk 2 ")
    # a full verification ignores the cache
    flip(path, 5 * MiB + 4096 * 3)
    assert read_template(str(d)).verified == "full"
    mark = n["reads"]
    assert read_template(str(d), verify="full").verified == "full"
    assert n["reads"] > mark
    mark = n["reads"]
    verify_template(str(d))
    assert n["reads"] > mark


def test_write_records_a_stamp(tmp_path, guest, monkeypatch):
    d = tmp_path / "tpl"
    rep = write(d, guest)
    assert rep.stamped
    n = count_reads(monkeypatch)
    assert read_template(str(d)).verified == "cache"
    assert n["reads"] == 0


def test_state_change_invalidates_stamp(tmp_path, guest):
    d = tmp_path / "tpl"
    write(d, guest)
    rewrite_state(d, lambda h: h.update(extra={"note": "edited"}))
    assert read_template(str(d)).verified == "full"


def test_racy_stamp_is_not_recorded(tmp_path, guest, monkeypatch):
    d = tmp_path / "tpl"
    write(d, guest, stamp=False)
    st = os.stat(os.path.realpath(d / "memory"))
    key = (vcache.file_key(str(d / "state"), os.stat(d / "state")),
           vcache.file_key(str(d / "memory"), st))
    last = max(k[5] for k in key)
    assert not vcache.record(key, last)  # same instant as the change: racy
    assert not vcache.record(key, last + int(vcache.racy_margin() * 1e9) - 1)
    assert not vcache.is_verified(key)
    assert vcache.record(key, last + int(vcache.racy_margin() * 1e9))
    assert vcache.is_verified(key)


def test_unwritable_cache_is_not_an_error(tmp_path, guest, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file, so no directory under it
    d = tmp_path / "tpl"
    rep = write(d, guest)
    assert not rep.stamped
    settle()
    assert read_template(str(d)).verified == "full"
    assert read_template(str(d)).verified == "full"


def test_memfile_zero_detection_matches_naive(guest):
    view = memoryview(guest.regions[0].mm)
    addr = guest.regions[0].host_addr
    for c in range(0, guest.size, memfile.CHUNK_SIZE):
        got = memfile.nonzero_pages(addr + c, memfile.CHUNK_SIZE)
        naive = [i for i in range(memfile.CHUNK_SIZE // 4096)
                 if any(view[c + i * 4096:c + (i + 1) * 4096].tobytes())]
        assert got == naive
    view.release()


# -- argument checks and concurrency ------------------------------------------------------

def test_section_names_and_versions(tmp_path, guest):
    d = tmp_path / "tpl"
    write(d, guest, sections={"virtio:blk0": (1, {"x": 1}), "serial": (0, None)})
    assert read_template(str(d)).sections == {"virtio:blk0": (1, {"x": 1}), "serial": (0, None)}
    for bad in ({"": (1, 1)}, {5: (1, 1)}, {"a\nb": (1, 1)}, {"cpu": (-1, 1)},
                {"cpu": ("1", 1)}, {"cpu": (True, 1)}, {"cpu": {"regs": 1}}, {"cpu": (1, {2: 3})}):
        with pytest.raises(SnapshotError):
            write(d, guest, sections=bad)
    with pytest.raises(SnapshotError, match="kvm_api_version"):
        write(d, guest, header={})
    with pytest.raises(SnapshotError, match="header_info"):
        write(d, guest, header={"kvm_api_version": 12, "obj": object()})
    assert read_template(str(d)).sections["serial"] == (0, None)  # nothing was replaced


def test_dataclass_sections(tmp_path, guest):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class SerialState:
        ier: int
        fifo: bytes

    d = tmp_path / "tpl"
    write(d, guest, sections={"serial": (1, SerialState(3, b"ab"))})
    assert read_template(str(d)).section("serial", 1) == {"ier": 3, "fifo": b"ab"}


def test_destination_is_a_file(tmp_path, guest):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SnapshotError, match="snapshot"):
        write(f, guest)


def test_state_must_be_a_regular_file(tmp_path):
    d = tmp_path / "tpl"
    d.mkdir()
    os.mkfifo(d / "state")
    (d / "memory").write_bytes(b"")
    expect(d, "not a regular file")


def test_readers_during_rewrites(tmp_path, guest):
    d = tmp_path / "tpl"
    write(d, guest)
    errors = []
    stop = threading.Event()

    def writer():
        try:
            for i in range(6):
                guest.write(0x5000, bytes([i + 1]))
                write(d, guest, stamp=False)
        except Exception as e:  # pragma: no cover
            errors.append(e)
        finally:
            stop.set()

    th = threading.Thread(target=writer)
    th.start()
    reads = 0
    while not stop.is_set() or reads == 0:
        t = read_template(str(d), verify=False)
        assert t.sections == SECTIONS
        reads += 1
    th.join()
    assert not errors
    assert read_template(str(d), verify="full").mem_size == 64 * MiB


# -- snapshots of restored guests (file-backed MAP_PRIVATE memory) ---------------------------

@pytest.fixture
def memcmp_bytes(monkeypatch):
    """Count the bytes the zero detection compares (i.e. reads)."""
    native = memfile._ctypes()
    real = native["memcmp"]
    seen = {"bytes": 0}

    def counting(a, b, n):
        seen["bytes"] += n
        return real(a, b, n)
    monkeypatch.setitem(native, "memcmp", counting)
    return seen


def test_untouched_anonymous_memory_is_not_read(tmp_path, guest, memcmp_bytes):
    write(tmp_path / "tpl", guest)
    assert memcmp_bytes["bytes"] < 8 * MiB  # the data, not the 64 MiB


def test_snapshot_of_restored_guest(tmp_path, guest, memcmp_bytes):
    a = tmp_path / "a"
    write(a, guest)
    t = read_template(str(a))
    restored = GuestMemory.from_file(t.memory_path, t.mem_size, mapped=True)
    try:
        region = restored.regions[0]
        pm = memfile._Pagemap()
        assert pm.mask_source(region.host_addr, region.size)[0] == "file"
        pm.close()
        restored.write(40 * MiB, b"new data in a hole")
        restored.write(5 * MiB + 4096 * 3, bytes(4096))  # a data page zeroed by the guest
        memcmp_bytes["bytes"] = 0
        b = tmp_path / "b"
        rep = write(b, restored)
        assert memcmp_bytes["bytes"] < 8 * MiB  # the file's holes were not read
        assert rep.data_bytes == write(tmp_path / "c", guest).data_bytes  # same page count: +1 -1
        tb = read_template(str(b), verify="full")
        m = GuestMemory.from_file(tb.memory_path, tb.mem_size, mapped=False)
        assert memory_bytes(m) == memory_bytes(restored)
        m.close()
    finally:
        restored.close()


def test_resnapshot_into_the_template_it_runs_from(tmp_path, guest):
    """The VM maps DIR's memory; writing DIR twice deletes that file (the mapping keeps it)."""
    d = tmp_path / "tpl"
    write(d, guest)
    t = read_template(str(d))
    vm = GuestMemory.from_file(t.memory_path, t.mem_size, mapped=True)
    try:
        for i in range(3):
            vm.write(0x9000 + i, b"\x55")
            write(d, vm)
            tb = read_template(str(d), verify="full")
            m = GuestMemory.from_file(tb.memory_path, tb.mem_size, mapped=False)
            assert memory_bytes(m) == memory_bytes(vm)
            m.close()
    finally:
        vm.close()


def test_stamp_after_write(tmp_path, guest):
    """A template written with stamp=False is fully verified once; stamp_template()
    (what a snapshot does after reporting completed) makes the next read use the cache."""
    from stratovirt_py.migration.format import stamp_template
    d = tmp_path / "late"
    report = write(d, guest, stamp=False)
    assert not report.stamped
    assert stamp_template(str(d), report.template_id)
    assert read_template(str(d)).verified == "cache"
