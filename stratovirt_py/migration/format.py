"""The snapshot template format: write, read and verify a template directory.

A template directory ``DIR`` holds ``DIR/state`` (all non-RAM state) and
``DIR/memory`` (guest RAM, sparse, mappable with ``GuestMemory.from_file``).  The
exact layout is in ``docs/snapshot-format.md``; in short::

    DIR/current -> gen-<id>        symlink, replaced atomically to switch templates
    DIR/state   -> current/state   convenience symlinks (constant)
    DIR/memory  -> current/memory
    DIR/gen-<id>/state             the state file (header, sections, checksums)
    DIR/gen-<id>/memory            guest RAM
    DIR/.lock                      flock()ed by writers

A directory holding plain ``state`` and ``memory`` files (for example copied
with ``cp -rL``) reads the same way.

API
---
(The writing half is in ``writer.py``; ``format.write_template`` and
``format.stamp_template`` reach it without the restore path importing it.)

``write_template(dir, header_info, sections, memory, *, cancel=None, progress=None,
stamp=True) -> WriteReport``
    Snapshot ``memory`` (a ``GuestMemory`` laid out by ``ram_layout``) and the named
    ``sections`` (``{name: (version, plain data or dataclass)}``) into ``dir``.
    ``header_info`` needs ``"kvm_api_version"`` (int); it may override ``"arch"``,
    ``"cpu_vendor"``, ``"vmm_version"``, and any other keys (plain data) are kept
    in the header under ``"extra"``.  ``cancel`` is a ``threading.Event``, checked
    before every 2 MiB chunk: when set, ``SnapshotCancelled`` is raised.
    ``progress(phase, done, total)`` is called with phase ``"memory"`` (bytes of
    guest memory done, of ``total``), then ``"sync"``, ``"state"``, ``"commit"``
    and ``"done"``.
    On any failure (``SnapshotError``, including ``ENOSPC``) the previous template in
    ``dir`` is untouched and the new files are removed.  ``stamp=True`` records the
    new template in the verification cache (it was checksummed as it was written),
    waiting up to ~20 ms for coarse file timestamps to move on.

``read_template(dir, *, verify=True, supported=None, check_host=True,
kvm_api_version=None, mem_size=None, progress=None) -> Template``
    Read and check the state; ``verify=True`` checks the memory data unless the
    verification cache says these exact files were verified before, ``"full"``
    always does, ``False`` never does (file sizes are still checked).
    ``supported`` (``{name: newest version this code reads}``) refuses unknown
    sections and sections newer than supported; ``Template.section`` does the same
    check for one section.  ``check_host`` refuses another architecture or CPU
    vendor; ``kvm_api_version`` another KVM API version; ``mem_size`` another
    memory size (before any data is read).  ``progress`` gets
    ``("verify", bytes done, total)`` during a data pass.  ``Template`` has
    ``dir``, ``state_path``, ``memory_path`` (the real file to map), ``header``,
    ``sections`` (``name -> (version, data)``), ``mem_size``, ``regions``
    (``(gpa, size, file_offset)``), ``verified`` (``"full"``/``"cache"``/``"no"``),
    ``template_id`` and ``section(name, supported_version=None)``.

``verify_template(dir, *, check_host=True, progress=None) -> VerifyReport``
    Everything, reading all memory data whatever the cache says (and then
    recording a stamp).

Every refusal is a ``SnapshotError`` with one message for the user.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
import time
from ..record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union
    ProgressFn = Callable[[str, int, int], None]

from .. import __version__
from ..errors import SnapshotError
from ..memory import PAGE_SIZE, ram_layout
from .. import jsonread
from . import codec, memfile, vcache
from .digest import sha256
from .memfile import CHECKSUM_NAME, CHUNK_SIZE, ENTRY, SnapshotCancelled, chunk_count

__all__ = [
    "FORMAT_VERSION", "MAGIC", "SnapshotCancelled", "Template", "VerifyReport", "WriteReport",
    "host_arch", "host_cpu_vendor", "read_template", "verify_template",
]  # write_template and stamp_template too, from writer.py (see __getattr__ at the end)

MAGIC = b"SVPYSNAP"
FORMAT_VERSION = 1
# magic, format version, header length, file length, reserved (0)
PREAMBLE = struct.Struct("<8sIIQQ")
DIGEST_LEN = 32  # sha256 trailer
MAX_STATE_SIZE = 1 << 30

STATE_NAME = "state"
MEMORY_NAME = "memory"
CURRENT_NAME = "current"
LOCK_NAME = ".lock"
GEN_PREFIX = "gen-"
TMP_PREFIX = ".tmp-"



def _utc_iso(seconds: float) -> str:
    """ISO 8601 UTC time, without importing datetime on the restore path."""
    t = time.gmtime(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(seconds % 1 * 1e6):06d}Z"


# -- host facts --------------------------------------------------------------------

def host_arch() -> str:
    return os.uname().machine


@functools.lru_cache(maxsize=1)
def host_cpu_vendor() -> str:
    """``vendor_id`` from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"), or "unknown"."""
    try:
        with open("/proc/cpuinfo", "r", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# -- results -----------------------------------------------------------------------

@record
class Template:
    """A template that passed the checks of ``read_template``."""

    dir: str
    state_path: str  # the real files (inside the current generation)
    memory_path: str
    header: Dict[str, Any]
    sections: Dict[str, Tuple[int, Any]]  # name -> (version, data)
    mem_size: int
    regions: List[Tuple[int, int, int]]  # (gpa, size, file offset)
    verified: str  # "full", "cache" or "no"
    state_size: int = 0
    memory_allocated: int = 0  # bytes of disk the memory file uses
    memory_table: bytes = field(default=b"", repr=False)
    verify_stats: Optional[memfile.MemoryVerifyStats] = field(default=None, repr=False)
    # After a full verification: writes the verification-cache stamp.  read_template
    # runs it, unless asked (stamp_later) to leave it to the caller, off the critical path.
    pending_stamp: Optional[Callable[[], bool]] = field(default=None, repr=False)

    @property
    def template_id(self) -> str:
        return self.header.get("template_id", "")

    def section(self, name: str, supported_version: Optional[int] = None) -> Any:
        """The data of section ``name``; refuses a missing section or one newer than supported."""
        if name not in self.sections:
            raise SnapshotError(f"template {self.dir} has no '{name}' section")
        version, data = self.sections[name]
        if supported_version is not None:
            _check_section_version(self, name, version, supported_version)
        return data

    def zero_chunks(self) -> int:
        return sum(1 for i in range(0, len(self.memory_table), ENTRY.size)
                   if ENTRY.unpack_from(self.memory_table, i)[1] == 0)


@record
class WriteReport:
    dir: str
    template_id: str
    mem_size: int
    data_bytes: int  # bytes of nonzero pages written
    state_size: int
    memory_seconds: float  # scanning + writing memory
    seconds: float  # everything, fsync included
    stamped: bool


@record
class VerifyReport:
    dir: str
    template_id: str
    mem_size: int
    data_chunks: int
    bytes_read: int
    reads: int
    seconds: float
    header: Dict[str, Any]


# -- the generation layout (shared with writer.py) ------------------------------

def _current_generation(dir: str) -> Optional[str]:
    try:
        target = os.readlink(os.path.join(dir, CURRENT_NAME))
    except OSError:
        return None
    return target if _valid_generation_name(target) else None


def _valid_generation_name(name: str) -> bool:
    return name.startswith(GEN_PREFIX) and "/" not in name and name not in (".", "..")


def _stamp_files(state_path: str, mem_path: str, *, wait: bool, note: Optional[dict] = None,
                 key: Optional[Tuple] = None, key_time_ns: Optional[int] = None) -> bool:
    try:
        if key is None:
            if wait:
                vcache.wait_until_not_racy([os.stat(state_path).st_ctime_ns,
                                            os.stat(mem_path).st_ctime_ns])
            key_time_ns = time.time_ns()
            key = (vcache.file_key(state_path, os.stat(state_path)),
                   vcache.file_key(mem_path, os.stat(mem_path)))
        return vcache.record(key, key_time_ns, note)
    except OSError:
        return False


# -- reading -----------------------------------------------------------------------

def _malformed(path: str, what: str) -> SnapshotError:
    return SnapshotError(f"state file {path} is corrupt: {what}")


def _parse_state(blob: bytes, path: str) -> Tuple[Dict[str, Any], memoryview]:
    """Check the framing and checksum; return (header, data area)."""
    if len(blob) < len(MAGIC) or blob[:len(MAGIC)] != MAGIC:
        if MAGIC.startswith(bytes(blob[:len(MAGIC)])):
            raise SnapshotError(f"state file {path} is truncated ({len(blob)} bytes)")
        raise SnapshotError(f"{path} is not a stratovirt-py template state file (bad magic)")
    if len(blob) < PREAMBLE.size:
        raise SnapshotError(f"state file {path} is truncated ({len(blob)} bytes)")
    _magic, version, hlen, total, _reserved = PREAMBLE.unpack_from(blob, 0)
    if version > FORMAT_VERSION:
        raise SnapshotError(
            f"template state {path} has format version {version}, newer than this "
            f"stratovirt-py {__version__} supports ({FORMAT_VERSION}); use a newer stratovirt-py")
    if version < 1:
        raise SnapshotError(f"template state {path} has unsupported format version {version}")
    if len(blob) < total:
        raise SnapshotError(f"state file {path} is truncated ({len(blob)} of {total} bytes)")
    if len(blob) > total:
        raise _malformed(path, f"{len(blob) - total} unexpected bytes after its end")
    if PREAMBLE.size + hlen + DIGEST_LEN > total:
        raise _malformed(path, "header length out of range")
    view = memoryview(blob)
    if sha256(view[:total - DIGEST_LEN]).digest() != blob[total - DIGEST_LEN:]:
        raise _malformed(path, "checksum mismatch")
    try:
        header = jsonread.loads(bytes(view[PREAMBLE.size:PREAMBLE.size + hlen]))
    except (ValueError, RecursionError) as e:
        raise _malformed(path, f"bad header ({e})") from None
    if not isinstance(header, dict):
        raise _malformed(path, "bad header")
    return header, view[PREAMBLE.size + hlen:total - DIGEST_LEN]


def _field(d: Any, key: str, typ, path: str, where: str = "header") -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _malformed(path, f"{where} lacks '{key}'")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise _malformed(path, f"{where} field '{key}' has the wrong type")
    return v


def _slice(data: memoryview, offset: int, length: int, path: str, what: str) -> memoryview:
    if offset < 0 or length < 0 or offset + length > len(data):
        raise _malformed(path, f"{what} lies outside the file")
    return data[offset:offset + length]


def _check_section_version(t: Template, name: str, version: int, supported: int) -> None:
    if version > supported:
        raise SnapshotError(
            f"template {t.dir}: section '{name}' has version {version}, newer than this "
            f"stratovirt-py {__version__} supports ({supported}); it was written by "
            f"stratovirt-py {t.header.get('vmm_version', '?')}")


def _locate(dir: str) -> Tuple[str, str]:
    """(state path, memory path) of the template in ``dir``, through ``current`` when present."""
    if not os.path.exists(dir):
        raise SnapshotError(f"template directory {dir} does not exist")
    if not os.path.isdir(dir):
        raise SnapshotError(f"template path {dir} is not a directory")
    base = dir
    cur = os.path.join(dir, CURRENT_NAME)
    if os.path.islink(cur):
        target = os.readlink(cur)
        if not _valid_generation_name(target):
            raise SnapshotError(f"template {dir} is corrupt: {cur} points to {target!r}")
        base = os.path.join(dir, target)
        if not os.path.isdir(base):
            raise _Vanished(f"template {dir} is incomplete: {target} is missing")
    return os.path.join(base, STATE_NAME), os.path.join(base, MEMORY_NAME)


def _open_ro(path: str, what: str, dir: str) -> Tuple[int, os.stat_result]:
    """Open a template file for reading; refuses anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise _Vanished(f"template {dir} has no {what} file ({path} is missing)") from None
    except OSError as e:
        raise SnapshotError(f"cannot open {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SnapshotError(f"template {dir}: {path} is not a regular file")
    return fd, st


class _Vanished(SnapshotError):
    """A template file is missing (maybe replaced by a concurrent writer: retry)."""


def _read_all(fd: int, size_hint: int) -> bytes:
    parts = []
    while True:
        b = os.read(fd, max(size_hint + 1, 65536))
        if not b:
            return b"".join(parts)
        parts.append(b)


def read_template(dir: str, *, verify: Union[bool, str] = True,
                  supported: Optional[Mapping[str, int]] = None, check_host: bool = True,
                  kvm_api_version: Optional[int] = None, mem_size: Optional[int] = None,
                  progress: Optional[ProgressFn] = None, stamp_later: bool = False) -> Template:
    """Read and check the template in ``dir`` (see the module docstring)."""
    if verify not in (True, False, "full"):
        raise ValueError("verify must be True, False or 'full'")
    dir = os.path.abspath(dir)
    for attempt in range(3):
        gen = _current_generation(dir)
        try:
            t = _read_template(dir, verify, supported, check_host, kvm_api_version,
                               mem_size, progress)
            if t.pending_stamp is not None and not stamp_later:
                t.pending_stamp()
                t.pending_stamp = None
            return t
        except _Vanished:
            # A writer may have switched `current` and removed the generation we
            # were reading: read the new one.
            if attempt == 2 or _current_generation(dir) == gen:
                raise
    raise AssertionError("unreachable")


def _read_template(dir: str, verify: Union[bool, str], supported: Optional[Mapping[str, int]],
                   check_host: bool, kvm_api_version: Optional[int], mem_size: Optional[int],
                   progress: Optional[ProgressFn]) -> Template:
    state_path, mem_path = _locate(dir)
    key_time_ns = time.time_ns()

    sfd, sst = _open_ro(state_path, "state", dir)
    try:
        if sst.st_size > MAX_STATE_SIZE:
            raise _malformed(state_path, f"{sst.st_size} bytes is too large")
        blob = _read_all(sfd, sst.st_size)
    except OSError as e:
        raise SnapshotError(f"cannot read {state_path}: {e.strerror}") from None
    finally:
        os.close(sfd)
    header, data = _parse_state(blob, state_path)

    # host checks
    arch = _field(header, "arch", str, state_path)
    vendor = _field(header, "cpu_vendor", str, state_path)
    if check_host:
        if arch != host_arch():
            raise SnapshotError(f"template {dir} was created on {arch}; this host is {host_arch()}")
        if vendor != host_cpu_vendor():
            raise SnapshotError(f"template {dir} was created on a {vendor} CPU; this host has "
                                f"{host_cpu_vendor()} (templates cannot move between CPU vendors)")
    kvm_api = _field(header, "kvm_api_version", int, state_path)
    if kvm_api_version is not None and kvm_api != kvm_api_version:
        raise SnapshotError(f"template {dir} was created with KVM API version {kvm_api}; "
                            f"this host has {kvm_api_version}")

    # memory description
    mem = _field(header, "memory", dict, state_path)
    size = _field(mem, "size", int, state_path, "memory")
    if size <= 0:
        raise _malformed(state_path, "memory size is not positive")
    if mem_size is not None and size != mem_size:
        raise SnapshotError(f"template {dir} has {size} bytes of memory ({size >> 20} MiB), "
                            f"this VM {mem_size} ({mem_size >> 20} MiB): -m must not change")
    if (_field(mem, "chunk_size", int, state_path, "memory") != CHUNK_SIZE
            or _field(mem, "page_size", int, state_path, "memory") != PAGE_SIZE
            or _field(mem, "checksum", str, state_path, "memory") != CHECKSUM_NAME):
        raise SnapshotError(f"template {dir} uses a memory checksum layout this stratovirt-py "
                            f"does not know")
    regions = []
    off = 0
    for gpa, rsize in ram_layout(size):
        regions.append((gpa, rsize, off))
        off += rsize
    got = [(_field(r, "gpa", int, state_path, "memory region"),
            _field(r, "size", int, state_path, "memory region"),
            _field(r, "offset", int, state_path, "memory region"))
           for r in _field(mem, "regions", list, state_path, "memory")]
    if got != regions:
        raise _malformed(state_path, "memory regions do not follow the RAM layout")
    table = bytes(_slice(data, _field(mem, "table_offset", int, state_path, "memory"),
                         _field(mem, "table_length", int, state_path, "memory"),
                         state_path, "memory checksum table"))
    if len(table) != chunk_count(size) * ENTRY.size:
        raise _malformed(state_path, "memory checksum table has the wrong length")

    mfd, mst = _open_ro(mem_path, "memory", dir)
    os.close(mfd)
    if mst.st_size < size:
        raise SnapshotError(f"memory file {mem_path} is truncated: {mst.st_size} bytes, "
                            f"the state describes {size}")
    if mst.st_size != size:
        raise SnapshotError(f"memory file {mem_path} has {mst.st_size} bytes, "
                            f"but the state describes {size}")

    t = Template(dir=dir, state_path=state_path, memory_path=mem_path, header=header,
                 sections={}, mem_size=size, regions=regions, verified="no",
                 state_size=len(blob), memory_allocated=mst.st_blocks * 512,
                 memory_table=table)

    # sections
    names = set()
    for i, ent in enumerate(_field(header, "sections", list, state_path)):
        where = f"section entry {i}"
        name = _field(ent, "name", str, state_path, where)
        version = _field(ent, "version", int, state_path, where)
        if _field(ent, "encoding", str, state_path, where) != codec.ENCODING:
            raise SnapshotError(f"template {dir}: section '{name}' uses encoding "
                                f"{ent['encoding']!r}, which this stratovirt-py does not know")
        if name in names:
            raise _malformed(state_path, f"section '{name}' appears twice")
        names.add(name)
        if supported is not None:
            if name not in supported:
                raise SnapshotError(f"template {dir} has a section '{name}' (version {version}) "
                                    f"that this stratovirt-py {__version__} does not know")
            _check_section_version(t, name, version, supported[name])
        payload = _slice(data, _field(ent, "offset", int, state_path, where),
                         _field(ent, "length", int, state_path, where), state_path, where)
        t.sections[name] = (version, codec.decode(bytes(payload),
                                                  f"template {dir}: section '{name}'"))

    # memory data
    if verify:
        key = (vcache.file_key(state_path, sst), vcache.file_key(mem_path, mst))
        if verify is True and vcache.is_verified(key):
            t.verified = "cache"
        else:
            t.verify_stats = memfile.verify_memory(mem_path, size, table, progress=progress)
            t.verified = "full"
            t.pending_stamp = functools.partial(
                _stamp_files, state_path, mem_path, wait=False, key=key, key_time_ns=key_time_ns,
                note={"template_id": t.template_id})
    return t


def verify_template(dir: str, *, check_host: bool = True,
                    progress: Optional[ProgressFn] = None) -> VerifyReport:
    """Check everything, reading all memory data (the cache is not consulted)."""
    t0 = time.perf_counter()
    t = read_template(dir, verify="full", check_host=check_host, progress=progress)
    st = t.verify_stats or memfile.MemoryVerifyStats()
    return VerifyReport(dir=t.dir, template_id=t.template_id, mem_size=t.mem_size,
                        data_chunks=st.data_chunks, bytes_read=st.bytes_read, reads=st.reads,
                        seconds=time.perf_counter() - t0, header=t.header)


def __getattr__(name: str) -> Any:
    # The writing half lives in writer.py, which a restore never needs to import.
    if name in ("write_template", "stamp_template"):
        from . import writer
        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
