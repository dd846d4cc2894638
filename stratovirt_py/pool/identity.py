"""Make a pool-forked VM process live exactly where its launcher lives.

Kata and other orchestrators place the process they start: they give it a network
namespace, move its pid into the sandbox's cgroups, drop its user, set its limits.
A VM forked by the pool would escape all of that, so the forked process takes the
launcher's identity before anything else happens in it: cgroups (joined through the
pool's view of the cgroup mounts, before leaving its mount namespace), then the
namespaces, root and working directory, then limits, affinity, priority and umask,
and last the user and groups.  It must run while the process is single-threaded
(setns into a mount namespace refuses a threaded process).

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


def cgroup_mounts() -> Dict[str, str]:
    """Controller set (as in /proc/PID/cgroup, "" for cgroup2) -> mount point, as this process sees it."""
    mounts: Dict[str, str] = {}
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
        point, fstype, options = fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            mounts.setdefault("", point)
        elif fstype == "cgroup":
            names = [o for o in options if o not in _V1_FLAGS and "=" not in o]
            names += [o for o in options if o.startswith("name=")]
            mounts.setdefault(",".join(sorted(names)), point)
    return mounts


def _cgroups_of(pid) -> List[Tuple[str, str]]:
    with open(f"/proc/{pid}/cgroup") as f:
        out = []
        for line in f.read().splitlines():
            _hid, controllers, path = line.split(":", 2)
            out.append((",".join(sorted(controllers.split(","))) if controllers else "", path))
        return out


def join_cgroups(pid: int, mounts: Dict[str, str]) -> None:
    """Move this process into every cgroup ``pid`` is in (where it is not already)."""
    try:
        theirs = _cgroups_of(pid)
        mine = dict(_cgroups_of("self"))
    except (OSError, ValueError) as e:
        raise IdentityError(f"cannot read the launcher's cgroups: {e}") from None
    for controllers, path in theirs:
        if mine.get(controllers) == path:
            continue
        point = mounts.get(controllers)
        if point is None:
            raise IdentityError(f"the launcher's cgroup {controllers or 'v2'}:{path} is not mounted "
                                "where the pool can see it")
        procs = os.path.join(point, path.lstrip("/"), "cgroup.procs")
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            raise IdentityError(f"cannot join the launcher's cgroup {procs}: {e.strerror}") from None


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def enter_namespaces(namespaces: List[Tuple[str, int]]) -> None:
    libc = None
    given = dict(namespaces)
    for kind in _NS_ORDER:
        fd = given.get(kind)
        if fd is None:
            continue
        try:
            if _same_file(os.stat(f"/proc/self/ns/{kind}"), os.fstat(fd)):
                continue
        except OSError:
            continue        # this kernel has no such namespace
        libc = libc or _libc()
        if libc.setns(fd, _NS_FLAGS[kind]) != 0:
            err = ctypes.get_errno()
            raise IdentityError(f"cannot enter the launcher's {kind} namespace: {os.strerror(err)}")


def enter_root_and_cwd(root: Optional[int], cwd: Optional[int]) -> None:
    if root is not None and not _same_file(os.stat("/"), os.fstat(root)):
        os.fchdir(root)
        os.chroot(".")
    if cwd is not None:
        os.fchdir(cwd)


def _set_limits(req: Request) -> None:
    for res, cur, hard in req.rlimits:
        try:
            if resource.getrlimit(res) != (cur, hard):
                resource.setrlimit(res, (cur, hard))
        except (ValueError, OSError) as e:
            raise IdentityError(f"cannot take the launcher's resource limit {res}: {e}") from None
    if req.affinity:
        try:
            os.sched_setaffinity(0, req.affinity)
        except OSError as e:
            raise IdentityError(f"cannot take the launcher's CPU affinity: {e.strerror}") from None
    if req.nice is not None and os.getpriority(os.PRIO_PROCESS, 0) != req.nice:
        os.setpriority(os.PRIO_PROCESS, 0, req.nice)
    try:
        with open(f"/proc/{req.pid}/oom_score_adj") as f:
            adj = f.read().strip()
        with open("/proc/self/oom_score_adj", "r+") as f:
            if f.read().strip() != adj:
                f.seek(0)
                f.write(adj)
    except OSError:
        pass                # best effort: a lower value needs privilege the pool may lack


def _set_user(req: Request) -> None:
    if req.groups is not None and sorted(os.getgroups()) != sorted(req.groups):
        os.setgroups(req.groups)
    if os.getresgid() != (req.gid,) * 3:
        os.setresgid(req.gid, req.gid, req.gid)
    if os.getresuid() != (req.uid,) * 3:
        os.setresuid(req.uid, req.uid, req.uid)


def adopt(req: Request, mounts: Dict[str, str]) -> None:
    """Take the launcher's identity; raises IdentityError (nothing of the VM exists yet)."""
    join_cgroups(req.pid, mounts)
    enter_namespaces(req.namespaces)
    enter_root_and_cwd(req.root, req.cwd)
    _set_limits(req)
    try:
        _set_user(req)
    except OSError as e:
        raise IdentityError(f"cannot take the launcher's user {req.uid}:{req.gid}: {e.strerror}") from None
    if req.umask is not None:
        os.umask(req.umask)
