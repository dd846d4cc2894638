"""Writing a template: state and memory files, made to appear atomically.

The layout and the reading side are in ``format.py`` (its docstring and
``docs/snapshot-format.md`` describe both).  ``write_template`` builds a new
generation directory, fsyncs it and switches the ``current`` symlink with one
rename; ``stamp_template`` records a fresh template in the verification cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from .. import __version__
from ..errors import SnapshotError
from ..memory import PAGE_SIZE, GuestMemory
from . import codec, memfile
from .format import (CURRENT_NAME, DIGEST_LEN, FORMAT_VERSION, GEN_PREFIX, LOCK_NAME, MAGIC,
                     MEMORY_NAME, PREAMBLE, STATE_NAME, TMP_PREFIX, WriteReport,
                     _current_generation, _stamp_files, _utc_iso,
                     host_arch, host_cpu_vendor)
from .memfile import CHECKSUM_NAME, CHUNK_SIZE, SnapshotCancelled

if TYPE_CHECKING:
    from .format import ProgressFn

# A template holds guest RAM: its owner's only, whatever the umask (which can only take
# bits away from these).
FILE_MODE = 0o600
DIR_MODE = 0o700


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 256 or not name.isprintable():
        raise SnapshotError(f"invalid snapshot section name {name!r}")
    return name


def _encode_sections(sections: Mapping[str, Any]) -> List[Tuple[str, int, bytes]]:
    out = []
    for name, item in sections.items():
        _check_name(name)
        try:
            version, data = item
        except (TypeError, ValueError):
            raise SnapshotError(f"snapshot section '{name}' must be given as (version, data)") from None
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise SnapshotError(f"snapshot section '{name}' has an invalid version {version!r}")
        out.append((name, version, codec.encode(data, f"snapshot section '{name}'")))
    return out


def _build_state(header: Dict[str, Any], sections: List[Tuple[str, int, bytes]],
                 table: bytes) -> bytes:
    data = bytearray()
    entries = []
    for name, version, payload in sections:
        entries.append({"name": name, "version": version, "encoding": codec.ENCODING,
                        "offset": len(data), "length": len(payload)})
        data += payload
    header = dict(header)
    header["sections"] = entries
    header["memory"] = dict(header["memory"], table_offset=len(data), table_length=len(table))
    data += table
    hjson = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    total = PREAMBLE.size + len(hjson) + len(data) + DIGEST_LEN
    blob = bytearray(PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(hjson), total, 0))
    blob += hjson
    blob += data
    blob += hashlib.sha256(blob).digest()
    return bytes(blob)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(data)
        while len(view):
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _symlink_replace(target: str, link: str, tmp: str) -> None:
    """Atomically make ``link`` a symlink to ``target`` (through the temporary ``tmp``)."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil  # writers only: the restore path never removes anything
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _foreign_entry(dir: str, name: str) -> Optional[str]:
    """Why ``DIR/name`` is not part of a template (None when it is).

    A writer removes stale generations and replaces ``state``/``memory``: in a
    directory that is not a template, those could be the user's files.
    """
    path = os.path.join(dir, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    is_link, is_dir = stat.S_ISLNK(st.st_mode), stat.S_ISDIR(st.st_mode)
    if name == CURRENT_NAME:
        return None if is_link and _current_generation(dir) else "is not a generation link"
    if name in (STATE_NAME, MEMORY_NAME):
        if is_link:
            ok = os.readlink(path) == os.path.join(CURRENT_NAME, name)
            return None if ok else "is a link that a template does not have"
        if stat.S_ISREG(st.st_mode) and _is_state_file(os.path.join(dir, STATE_NAME)):
            return None         # a copied template (cp -rL): two plain files
        return "is not a template file"
    if name == LOCK_NAME:
        return None if stat.S_ISREG(st.st_mode) else "is not a plain file"
    if name.startswith(TMP_PREFIX):
        return None if is_link else "is not a temporary link"
    if name.startswith(GEN_PREFIX) and is_dir:
        extra = set(os.listdir(path)) - {STATE_NAME, MEMORY_NAME}
        return f"holds {sorted(extra)[0]!r}" if extra else None
    return "is not part of a template"


def _is_state_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _check_destination(dir: str) -> None:
    try:
        names = os.listdir(dir)
    except OSError as e:
        raise SnapshotError(f"cannot read snapshot directory {dir}: {e.strerror}") from None
    for name in sorted(names):
        why = _foreign_entry(dir, name)
        if why:
            raise SnapshotError(f"snapshot destination {dir} is neither empty nor a template: "
                                f"{name} {why}")


def _cleanup_stale(dir: str, keep: Optional[str]) -> None:
    """Remove generations other than ``keep`` and temporaries left by a crashed writer."""
    try:
        names = os.listdir(dir)
    except OSError:
        return
    for n in names:
        if (n.startswith(GEN_PREFIX) and n != keep) or n.startswith(TMP_PREFIX):
            _remove(os.path.join(dir, n))



def write_template(dir: str, header_info: Mapping[str, Any], sections: Mapping[str, Any],
                   memory: GuestMemory, *, cancel: Optional[threading.Event] = None,
                   progress: Optional[ProgressFn] = None, stamp: bool = True) -> WriteReport:
    """Write a template into ``dir`` atomically (see the module docstring)."""
    t0 = time.perf_counter()
    dir = os.path.abspath(dir)
    info = dict(header_info)
    kvm_api = info.pop("kvm_api_version", None)
    if not isinstance(kvm_api, int) or isinstance(kvm_api, bool):
        raise SnapshotError("header_info needs an integer 'kvm_api_version'")
    arch = info.pop("arch", None) or host_arch()
    vendor = info.pop("cpu_vendor", None) or host_cpu_vendor()
    vmm_version = info.pop("vmm_version", None) or __version__
    encoded = _encode_sections(sections)
    codec.encode(info, "snapshot header_info")  # refuse non-plain extras early

    def report(phase: str, done: int = 0, total: int = 0) -> None:
        if progress is not None:
            progress(phase, done, total)

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise SnapshotCancelled("snapshot cancelled")

    try:
        os.makedirs(dir, DIR_MODE, exist_ok=True)
    except OSError as e:
        raise SnapshotError(f"cannot create snapshot directory {dir}: {e.strerror}") from None
    if not os.path.isdir(dir):
        raise SnapshotError(f"snapshot destination {dir} is not a directory")
    _check_destination(dir)
    try:
        # O_NOFOLLOW: a symlink planted as .lock would make root create (or open) any file.
        lock_fd = os.open(os.path.join(dir, LOCK_NAME),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SnapshotError(f"cannot write snapshot to {dir}: {LOCK_NAME} is a "
                                "symbolic link") from None
        raise SnapshotError(f"cannot write snapshot to {dir}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SnapshotError(f"another snapshot is being written to {dir}") from None
        _cleanup_stale(dir, _current_generation(dir))

        template_id = os.urandom(8).hex()
        gen_name = GEN_PREFIX + template_id
        gen = os.path.join(dir, gen_name)
        tmp_link = os.path.join(dir, TMP_PREFIX + template_id)
        committed = False
        try:
            check_cancel()
            os.mkdir(gen, DIR_MODE)
            mem_path = os.path.join(gen, MEMORY_NAME)
            fd = os.open(mem_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                table, mstats = memfile.write_memory(fd, memory, cancel=cancel, progress=progress)
                check_cancel()
                report("sync", 0, 1)
                os.fsync(fd)
            finally:
                os.close(fd)

            report("state", 0, 1)
            now = time.time_ns()
            layout = memfile.check_layout(memory)
            header = {
                "arch": arch,
                "cpu_vendor": vendor,
                "kvm_api_version": kvm_api,
                "vmm": "stratovirt-py",
                "vmm_version": vmm_version,
                "created": _utc_iso(now / 1e9),
                "created_ns": now,
                "template_id": template_id,
                "memory": {
                    "size": memory.size,
                    "page_size": PAGE_SIZE,
                    "chunk_size": CHUNK_SIZE,
                    "checksum": CHECKSUM_NAME,
                    "regions": [{"gpa": g, "size": s, "offset": o} for g, s, o in layout],
                    "data_bytes": mstats.data_bytes,
                    "data_chunks": mstats.data_chunks,
                },
            }
            if info:
                header["extra"] = info
            state = _build_state(header, encoded, table)
            state_path = os.path.join(gen, STATE_NAME)
            _write_file(state_path, state)
            _fsync_dir(gen)
            check_cancel()

            report("commit", 0, 1)
            # The switch: one rename of the `current` symlink.
            _symlink_replace(gen_name, os.path.join(dir, CURRENT_NAME), tmp_link)
            committed = True
            _fsync_dir(dir)
        except BaseException as e:
            if not committed:
                _remove(gen)
                _remove(tmp_link)
            if isinstance(e, OSError):
                raise SnapshotError(f"cannot write snapshot to {dir}: "
                                    f"{e.strerror or e}") from None
            raise

        # After the commit: convenience symlinks and removal of the old generation.
        # Failures here do not matter to readers, which go through `current`.
        try:
            changed = False
            for name in (MEMORY_NAME, STATE_NAME):
                link = os.path.join(dir, name)
                want = os.path.join(CURRENT_NAME, name)
                if not (os.path.islink(link) and os.readlink(link) == want):
                    _symlink_replace(want, link, os.path.join(dir, TMP_PREFIX + name))
                    changed = True
            if changed:     # they never change once made: no sync on later snapshots
                _fsync_dir(dir)
        except OSError:
            pass
        _cleanup_stale(dir, gen_name)
    finally:
        os.close(lock_fd)

    stamped = False
    if stamp:
        stamped = _stamp_files(state_path, mem_path, wait=True, note={"template_id": template_id})
    report("done", 1, 1)
    return WriteReport(dir=dir, template_id=template_id, mem_size=memory.size,
                       data_bytes=mstats.data_bytes, state_size=len(state),
                       memory_seconds=mstats.seconds, seconds=time.perf_counter() - t0,
                       stamped=stamped)


def stamp_template(dir: str, template_id: str = "") -> bool:
    """Record a template just written with ``stamp=False`` in the verification cache.

    Waits (~20 ms) until its file timestamps can no longer be confused with a later
    change: callers run it off their critical path.
    """
    state_path = os.path.realpath(os.path.join(dir, STATE_NAME))
    mem_path = os.path.realpath(os.path.join(dir, MEMORY_NAME))
    return _stamp_files(state_path, mem_path, wait=True, note={"template_id": template_id})

