"""Make a pool-forked VM process live exactly where its launcher lives.

Kata and other orchestrators place the process they start: they give it a network
namespace, move its pid into the sandbox's cgroups, drop its user, set its limits.
A VM forked by the pool would escape all of that, so the forked process takes the
launcher's identity before anything else happens in it: cgroups (joined through the
pool's view of the cgroup mounts, before leaving its mount namespace), then the
namespaces, root and working directory, then limits, affinity, priority and umask,
and last the user and groups.  It must run while the process is single-threaded
(setns into a mount namespace refuses a threaded process).

Everything is read from /proc/PID of the launcher, whose pid, uid and gid the kernel
gave (SO_PEERCRED), never taken from the request: a pool running as root must not
let a launcher claim a group, a limit or a namespace it does not have.

What it does not take: the launcher's pid and user namespaces (a process cannot
enter those itself) and its capability sets; see docs/architecture.md.
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Dict, List, Optional, Tuple

from ..errors import VmmError
from .request import Request

# CLONE_NEW* flags for setns, by the name /proc/PID/ns uses
_NS_FLAGS = {"mnt": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000, "ipc": 0x08000000,
             "net": 0x40000000}
# mnt last: after it, paths resolve in the launcher's view
_NS_ORDER = ("net", "ipc", "uts", "cgroup", "mnt")
# cgroup v1 mount options that are not controller names
_V1_FLAGS = {"rw", "ro", "clone_children", "noprefix", "xattr", "cpuset_v2_mode", "favordynmods"}


class IdentityError(VmmError):
    pass


def cgroup_mounts() -> Dict[str, Tuple[str, str]]:
    """Controller set (as in /proc/PID/cgroup, "" for cgroup2) -> (mount point, the cgroup
    mounted there), as this process sees them."""
    mounts: Dict[str, Tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return mounts
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype, options = fields[3], fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            mounts.setdefault("", (point, root))
        elif fstype == "cgroup":
            names = [o for o in options if o not in _V1_FLAGS and "=" not in o]
            names += [o for o in options if o.startswith("name=")]
            mounts.setdefault(",".join(sorted(names)), (point, root))
    return mounts


def _cgroups_of(pid) -> List[Tuple[str, str]]:
    with open(f"/proc/{pid}/cgroup") as f:
        out = []
        for line in f.read().splitlines():
            _hid, controllers, path = line.split(":", 2)
            out.append((",".join(sorted(controllers.split(","))) if controllers else "", path))
        return out


def join_cgroups(pid: int, mounts: Dict[str, Tuple[str, str]]) -> None:
    """Move this process into every cgroup ``pid`` is in (where it is not already)."""
    try:
        theirs = _cgroups_of(pid)
        mine = dict(_cgroups_of("self"))
    except (OSError, ValueError) as e:
        raise IdentityError(f"cannot read the launcher's cgroups: {e}") from None
    for controllers, path in theirs:
        if mine.get(controllers) == path:
            continue
        point, root = mounts.get(controllers, (None, "/"))
        inside = root == "/" or path == root or path.startswith(root.rstrip("/") + "/")
        if point is None or not inside:
            raise IdentityError(f"the launcher's cgroup {controllers or 'v2'}:{path} is not mounted "
                                "where the pool can see it")
        rel = path[len(root.rstrip("/")):] if root != "/" else path
        procs = os.path.join(point, rel.lstrip("/"), "cgroup.procs")
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            raise IdentityError(f"cannot join the launcher's cgroup {procs}: {e.strerror}") from None


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _open_own(pid: int, what: str, flags: int) -> Optional[int]:
    try:
        return os.open(f"/proc/{pid}/{what}", flags | os.O_CLOEXEC)
    except FileNotFoundError:
        return None         # this kernel has no such namespace
    except OSError as e:
        raise IdentityError(f"cannot read the launcher's {what}: {e.strerror}") from None


def enter_namespaces(pid: int) -> None:
    libc = None
    for kind in _NS_ORDER:
        fd = _open_own(pid, f"ns/{kind}", os.O_RDONLY)
        if fd is None:
            continue
        try:
            if _same_file(os.stat(f"/proc/self/ns/{kind}"), os.fstat(fd)):
                continue
            libc = libc or _libc()
            if libc.setns(fd, _NS_FLAGS[kind]) != 0:
                err = ctypes.get_errno()
                raise IdentityError(f"cannot enter the launcher's {kind} namespace: {os.strerror(err)}")
        finally:
            os.close(fd)


def enter_root_and_cwd(pid: int) -> None:
    # Both opened before either changes: /proc/PID/cwd resolves through the launcher's root.
    root = _open_own(pid, "root", os.O_PATH | os.O_DIRECTORY)
    cwd = _open_own(pid, "cwd", os.O_PATH | os.O_DIRECTORY)
    try:
        if root is not None and not _same_file(os.stat("/"), os.fstat(root)):
            os.fchdir(root)
            os.chroot(".")
        if cwd is not None:
            os.fchdir(cwd)
    finally:
        for fd in (root, cwd):
            if fd is not None:
                os.close(fd)


def _status(pid: int) -> Dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _limits(pid: int) -> List[Tuple[int, int, int]]:
    """(resource, soft, hard) from /proc/PID/limits, whose rows are in resource order.

    (prlimit(2) on another process needs its exact uid and gid, or CAP_SYS_RESOURCE.)
    """
    def value(text: str) -> int:
        return resource.RLIM_INFINITY if text == "unlimited" else int(text)
    with open(f"/proc/{pid}/limits") as f:
        rows = f.read().splitlines()[1:]
    return [(res, value(row[26:].split()[0]), value(row[26:].split()[1]))
            for res, row in enumerate(rows)]


def _set_limits(pid: int) -> None:
    try:
        limits = _limits(pid)
    except (OSError, ValueError, IndexError) as e:
        raise IdentityError(f"cannot read the launcher's resource limits: {e}") from None
    for res, soft, hard in limits:
        try:
            if resource.getrlimit(res) != (soft, hard):
                resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError) as e:
            raise IdentityError(f"cannot take the launcher's resource limit {res}: {e}") from None
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(pid))
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as e:
        raise IdentityError(f"cannot take the launcher's CPU affinity or priority: {e.strerror}") from None
    try:
        with open(f"/proc/{pid}/oom_score_adj") as f:
            adj = f.read().strip()
        with open("/proc/self/oom_score_adj", "r+") as f:
            if f.read().strip() != adj:
                f.seek(0)
                f.write(adj)
    except OSError:
        pass                # best effort: a lower value needs privilege the pool may lack


def _set_user(uid: int, gid: int, groups: List[int]) -> None:
    if sorted(os.getgroups()) != sorted(groups):
        os.setgroups(groups)
    if os.getresgid() != (gid,) * 3:
        os.setresgid(gid, gid, gid)
    if os.getresuid() != (uid,) * 3:
        os.setresuid(uid, uid, uid)


def adopt(req: Request, mounts: Dict[str, Tuple[str, str]]) -> None:
    """Take the launcher's identity; raises IdentityError (nothing of the VM exists yet)."""
    pid = req.pid
    try:
        status = _status(pid)
        groups = [int(g) for g in status.get("Groups", "").split()]
        umask = int(status["Umask"], 8) if "Umask" in status else None
    except (OSError, ValueError) as e:
        raise IdentityError(f"cannot read the launcher's status: {e}") from None
    join_cgroups(pid, mounts)
    enter_namespaces(pid)
    enter_root_and_cwd(pid)
    _set_limits(pid)
    try:
        _set_user(req.uid, req.gid, groups)
    except OSError as e:
        raise IdentityError(f"cannot take the launcher's user {req.uid}:{req.gid}: {e.strerror}") from None
    if umask is not None:
        os.umask(umask)
