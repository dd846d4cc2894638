"""The verification cache: remember templates whose memory data was verified.

Verifying a template's memory reads all of its data, which is too slow for a
warm start.  After a successful verification a *stamp* is written under
``${XDG_CACHE_HOME:-~/.cache}/stratovirt-py/verified/``; its name is the SHA-256
of the key::

    [[realpath, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns]  # state file
     [realpath, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns]] # memory file

and a later restore whose files have the same key skips the data pass.  Any
write to a file changes its ctime (which user space cannot set back), so a
modified template never matches its old stamp.

Coarse timestamps: a filesystem may take ctime from a clock that only ticks every
few milliseconds, so a change within the same tick as the stat() that produced
the key would keep the key.  A stamp is therefore only written when both ctimes
are at least ``racy_margin()`` older than the moment the key was taken; then any
later change gets a later ctime.  (This assumes the filesystem's clock is this
host's clock; on a network filesystem with a skewed server clock, use
``verify_template`` or ``read_template(..., verify="full")``.)

A cache directory that cannot be written only disables the cache.
"""

from __future__ import annotations

import os
import time

from .digest import sha256

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import List, Optional, Sequence, Tuple
    Key = Tuple[Tuple, ...]

MAX_STAMPS = 4096



def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stratovirt-py", "verified")


def racy_margin() -> float:
    """Seconds a file's ctime must lie before the key's time for a stamp to be safe."""
    try:
        res = time.clock_getres(getattr(time, "CLOCK_REALTIME_COARSE", 5))
    except (OSError, AttributeError):
        res = 0.01
    return max(3 * res, 0.02)


def file_key(path: str, st: os.stat_result) -> Tuple:
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns)


def _stamp_path(key: Sequence[Tuple]) -> str:
    digest = sha256(repr([list(k) for k in key]).encode()).hexdigest()
    return os.path.join(cache_dir(), digest)


def is_verified(key: Sequence[Tuple]) -> bool:
    return os.path.exists(_stamp_path(key))


def record(key: Sequence[Tuple], key_time_ns: int, note: Optional[dict] = None) -> bool:
    """Write the stamp for ``key`` (taken at ``key_time_ns``, time.time_ns()).

    Returns False (and writes nothing) when the key is racy or the cache cannot
    be written.
    """
    margin_ns = int(racy_margin() * 1e9)
    if any(k[5] > key_time_ns - margin_ns for k in key):
        return False
    path = _stamp_path(key)
    body = {"key": [list(k) for k in key], "verified_ns": key_time_ns}
    if note:
        body.update(note)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        import json
        with open(tmp, "w") as f:
            json.dump(body, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    _prune(os.path.dirname(path))
    return True


def _prune(directory: str) -> None:
    """Keep the cache bounded: past MAX_STAMPS stamps, drop the older half."""
    try:
        names = os.listdir(directory)
        if len(names) <= MAX_STAMPS:
            return
        entries: List[Tuple[float, str]] = []
        for n in names:
            p = os.path.join(directory, n)
            try:
                entries.append((os.stat(p).st_mtime, p))
            except OSError:
                pass
        entries.sort()
        for _, p in entries[:len(entries) // 2]:
            try:
                os.unlink(p)
            except OSError:
                pass
    except OSError:
        pass


def wait_until_not_racy(ctimes_ns: Sequence[int]) -> None:
    """Sleep until every ctime is older than the racy margin (at most the margin)."""
    margin_ns = int(racy_margin() * 1e9)
    delay = max(ctimes_ns) + margin_ns + 1_000_000 - time.time_ns()
    if delay > 0:
        time.sleep(min(delay / 1e9, racy_margin() + 0.01))
