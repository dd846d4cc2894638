"""One entry point per parser of untrusted bytes, shared by the corpus replay
(test_fuzz_corpus.py), the hypothesis property tests and ``tools/fuzz``.

``run(parser, data)`` feeds ``data`` to that parser and checks the contract: a correct
result, or the parser's own error with a one-line message; any other exception fails.
Inputs are raw bytes so that every case, seed or found, is a file in
``tests/fuzz_corpus/<parser>/``; the few numbers a parser takes besides its bytes
(a memory size, a kernel's end) are a small little-endian prefix described below.

Environment (see tools/fuzz):
  STRATOVIRT_FUZZ_EXAMPLES  hypothesis examples per property test (CI keeps a small number)
  STRATOVIRT_FUZZ_SAVE=1    a case that breaks the contract is written into the corpus
"""

from __future__ import annotations

import atexit
import hashlib
import os
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings

CORPUS = Path(__file__).parent / "fuzz_corpus"
MiB = 1 << 20
# Sizes taken from a case are clamped here: the contract is about bytes, not about how
# much disk or RAM a test may use (the products' own limits are tested elsewhere).
MAX_MEMFILE = 64 * MiB
INITRD_RAM = 4 * MiB
KERNEL_RAM = 128 * MiB

# memtable: <Q memory size><I table length> table, then patches <Q offset><I length> bytes
MEMTABLE_HEAD = struct.Struct("<QI")
PATCH = struct.Struct("<QI")
# initrd: <Q kernel end><Q highest address> the initrd's bytes
INITRD_HEAD = struct.Struct("<QQ")
# virtq: <B flags><H avail idx><B heads> heads (one byte each), the descriptor table, an
#        indirect table put at INDIRECT_AT; flags: bits 0-1 log2(queue size) - 1, bit 2
#        indirect negotiated, bit 3 avail idx as given (else the number of heads)
VIRTQ_HEAD = struct.Struct("<BHB")
VIRTQ_RAM = 4 * MiB
INDIRECT_AT = 0x200000
DESC_AT, AVAIL_AT, USED_AT = 0x10000, 0x11000, 0x12000


def examples(default: int) -> int:
    """``default`` in CI; a campaign sets STRATOVIRT_FUZZ_EXAMPLES."""
    return int(os.environ.get("STRATOVIRT_FUZZ_EXAMPLES", default))


def fuzz_settings(default: int) -> settings:
    campaign = "STRATOVIRT_FUZZ_EXAMPLES" in os.environ
    # derandomized in CI, so that a run is reproducible and its time fixed; a campaign
    # explores.  The deadline catches a hang (the parsers take milliseconds).
    return settings(max_examples=examples(default), derandomize=not campaign, deadline=5000,
                    database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                          HealthCheck.too_slow,
                                                          HealthCheck.data_too_large])


def seeds(parser: str) -> "list[bytes]":
    return [p.read_bytes() for p in sorted((CORPUS / parser).iterdir()) if p.is_file()]


def corpus_files() -> "list[tuple[str, Path]]":
    return [(d.name, p) for d in sorted(CORPUS.iterdir()) if d.is_dir()
            for p in sorted(d.iterdir()) if p.is_file()]


def one_line(err: BaseException) -> None:
    msg = str(err)
    # printable: one line, and no control character that a log or terminal would obey
    assert msg and msg.isprintable() and "internal error" not in msg, repr(msg)


_failed: "dict[str, bytes]" = {}


def run(parser: str, data: bytes) -> object:
    try:
        return PARSERS[parser](data)
    except Exception:
        if os.environ.get("STRATOVIRT_FUZZ_SAVE"):
            if not _failed:
                atexit.register(_keep_failed)
            # hypothesis shrinks a failure and replays the smallest case last: only
            # that one is kept, not every step of the shrinking
            _failed[parser] = data
        raise


def _keep_failed() -> None:
    for parser, data in _failed.items():
        keep(parser, data)


def keep(parser: str, data: bytes) -> Path:
    path = CORPUS / parser / f"found-{hashlib.sha256(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


# -- the template's memory file against its checksum table ------------------------------------

def memtable_encode(size: int, table: bytes, patches: "list[tuple[int, bytes]]") -> bytes:
    return (MEMTABLE_HEAD.pack(size, len(table)) + table
            + b"".join(PATCH.pack(off, len(b)) + b for off, b in patches))


def memtable_decode(data: bytes) -> "tuple[int, bytes, list[tuple[int, bytes]]]":
    """Whatever the bytes: a short field reads as zero, a patch is cut at the end."""
    head = data[:MEMTABLE_HEAD.size].ljust(MEMTABLE_HEAD.size, b"\0")
    size, tlen = MEMTABLE_HEAD.unpack(head)
    pos = MEMTABLE_HEAD.size
    table = data[pos:pos + tlen]
    pos += len(table)
    patches = []
    while pos + PATCH.size <= len(data):
        off, n = PATCH.unpack_from(data, pos)
        pos += PATCH.size
        patches.append((off, data[pos:pos + n]))
        pos += n
    return min(size, MAX_MEMFILE), table, patches


def memtable_file(path: str, size: int, patches) -> None:
    """A sparse file of ``size`` bytes with the patches written (past the end extends it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off, b in patches:
            if b and off <= MAX_MEMFILE:
                os.pwrite(fd, b, off)
    finally:
        os.close(fd)


def _memtable(data: bytes):
    from stratovirt_py.errors import SnapshotError
    from stratovirt_py.migration.memfile import verify_memory
    size, table, patches = memtable_decode(data)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "memory")
        memtable_file(path, size, patches)
        try:
            return verify_memory(path, size, table)
        except SnapshotError as e:
            one_line(e)
            return e


# -- a template's state file, read and checked as a restore would -------------------------------

def restamp(state: bytes) -> bytes:
    """The state with its length field and sha256 trailer made right again, as anyone
    who can write a template can: what is left to refuse is the content."""
    from stratovirt_py.migration.format import PREAMBLE
    if len(state) < PREAMBLE.size + 32:
        return state
    magic, version, hlen, _total, reserved = PREAMBLE.unpack_from(state)
    body = PREAMBLE.pack(magic, version, hlen, len(state), reserved) + state[PREAMBLE.size:-32]
    return body + hashlib.sha256(body).digest()


def _template_state(data: bytes):
    from stratovirt_py.errors import SnapshotError
    from stratovirt_py.migration import format as fmt
    from stratovirt_py.migration.snapshot import check_sections
    size = 16 * MiB
    try:    # the memory file a restore would map: as big as the state says, if it can say
        hlen = fmt.PREAMBLE.unpack_from(data)[2]
        mem = fmt.jsonread.loads(data[fmt.PREAMBLE.size:fmt.PREAMBLE.size + hlen])["memory"]
        if type(mem["size"]) is int and 0 < mem["size"] <= MAX_MEMFILE:
            size = mem["size"]
    except Exception:  # noqa: BLE001 - a broken header: the parser below says why
        pass
    with tempfile.TemporaryDirectory() as d:
        Path(d, "state").write_bytes(data)
        memtable_file(os.path.join(d, "memory"), size, [])
        try:
            t = fmt.read_template(d, verify="full", check_host=False, stamp_later=True)
            check_sections(t)
            return t
        except SnapshotError as e:
            one_line(e)
            return e


# -- the QMP message layer ----------------------------------------------------------------------

def _qmp(data: bytes):
    from stratovirt_py.qmp import schema
    from stratovirt_py.qmp.commands import COMMANDS, Dispatcher
    from stratovirt_py.qmp.protocol import (MAX_MESSAGE_BYTES, MessageSplitter, QmpInputError,
                                            TooLong, parse_request)
    whole, split = MessageSplitter(), MessageSplitter()
    messages = whole.feed(data)
    pieces = []
    for i in range(0, len(data), 7):    # how it arrives must not change what it says
        pieces += split.feed(data[i:i + 7])
        assert split.pending <= MAX_MESSAGE_BYTES
    assert [m if isinstance(m, bytes) else m.size for m in pieces] == \
        [m if isinstance(m, bytes) else m.size for m in messages]
    results = []
    for m in messages:
        if isinstance(m, TooLong):
            assert m.reason()
            continue
        try:
            req = parse_request(m)
            entry = COMMANDS.get(req.command)
            if entry is not None:
                results.append(schema.validate(req.arguments, entry[1]))
            else:       # refused before the machine is looked at
                desc = Dispatcher(None).dispatch(req).reply["error"]["desc"]
                one_line(QmpInputError(desc))
                results.append(desc)
        except QmpInputError as e:
            one_line(e)
            results.append(e)
    return results


# -- virtqueue descriptor chains ----------------------------------------------------------------

def _virtq(data: bytes):
    from stratovirt_py.devices.virtio.queue import Queue, QueueError
    from stratovirt_py.memory import GuestMemory
    head = data[:VIRTQ_HEAD.size].ljust(VIRTQ_HEAD.size, b"\0")
    flags, avail_idx, nheads = VIRTQ_HEAD.unpack(head)
    size = 2 << (flags & 3)
    pos = VIRTQ_HEAD.size
    heads = data[pos:pos + nheads]
    pos += len(heads)
    table = data[pos:pos + 16 * size]
    indirect = data[pos + len(table):pos + len(table) + 0x1000]
    mem = GuestMemory.anonymous(VIRTQ_RAM)
    try:
        mem.write(DESC_AT, table)
        mem.write(INDIRECT_AT, indirect)
        mem.write(AVAIL_AT, struct.pack("<HH", 0, avail_idx if flags & 8 else len(heads)))
        for i, h in enumerate(heads[:size]):
            mem.write_u16(AVAIL_AT + 4 + 2 * i, h)
        q = Queue(mem, 256)
        q.size, q.indirect = size, bool(flags & 4)
        q.desc_table, q.avail_ring, q.used_ring = DESC_AT, AVAIL_AT, USED_AT
        q.validate()
        q.ready = True
        chains = []
        for _ in range(size + 1):
            try:
                chain = q.pop()
            except QueueError as e:
                one_line(e)
                break
            if chain is None:
                break
            for addr, n in chain.readable + chain.writable:
                assert mem.check(addr, n), (addr, n)
            assert chain.readable_len + chain.writable_len < 1 << 32
            chains.append(chain.head)
        return chains
    finally:
        mem.close()


# -- the kernel and initrd loader ---------------------------------------------------------------

def _load(data: bytes, ram: int, load):
    from stratovirt_py.errors import BootError
    from stratovirt_py.memory import GuestMemory
    mem = GuestMemory.anonymous(ram)
    try:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "image")
            Path(path).write_bytes(data)
            try:
                return load(mem, path)
            except BootError as e:
                one_line(e)
                return e
    finally:
        mem.close()


def _kernel(data: bytes):
    from stratovirt_py.boot.loader import load_kernel

    def load(mem, path):
        k = load_kernel(mem, path)
        # an ELF of empty segments loads nothing and ends at 0: the guest's problem,
        # the kernel comes from the host's administrator
        assert mem.check(k.entry, 1) and k.end >= 0
        return k
    return _load(data, KERNEL_RAM, load)


def _initrd(data: bytes):
    from stratovirt_py.boot.loader import load_initrd
    from stratovirt_py.memory import PAGE_SIZE
    head = data[:INITRD_HEAD.size].ljust(INITRD_HEAD.size, b"\0")
    kernel_end, addr_max = INITRD_HEAD.unpack(head)
    payload = data[INITRD_HEAD.size:]

    def load(mem, path):
        addr, n = load_initrd(mem, path, kernel_end, addr_max)
        assert n == len(payload) and addr % PAGE_SIZE == 0 and addr >= kernel_end
        assert addr + n <= min(mem.regions[0].end, addr_max)
        assert mem.read(addr, n) == payload
        return addr, n
    return _load(payload, INITRD_RAM, load)


PARSERS = {"memtable": _memtable, "template_state": _template_state, "qmp": _qmp,
           "virtq": _virtq, "kernel": _kernel, "initrd": _initrd}
