"""The VMM's seccomp filter: one allow-list for every thread, installed once the guest runs.

It is installed after ``Vmm.start`` and the QMP server's start (``cli._run_vm``), never
before: building the VM (template parsing, device set-up) happens unfiltered, and the
warm start's critical path pays nothing.  ``SCMP_FLTATR_CTL_TSYNC`` puts it on every
thread that exists (vCPUs, I/O threads, QMP) and threads made later inherit it.

Anything outside the list fails with EPERM rather than killing the VMM: Python reaches
the kernel from places no test can enumerate (lazy imports, error paths, the garbage
collector), and a guest whose VMM dies on such a path is lost, while EPERM becomes an
error reply or a logged failure.  The filter asks the kernel to log every refusal
(``SCMP_FLTATR_CTL_LOG``: an ``audit: type=1326 ... syscall=N`` line in the kernel log).

libseccomp (``libseccomp.so.2``, a Debian base package) is reached through cffi's
backend, which the KVM bindings load anyway: declaring five functions by hand costs
0.1 ms, where parsing a C declaration (``cffi.FFI.cdef``, pycparser) costs ~35 ms of a
running guest's GIL; nothing is compiled and no header package is needed.
"""

from __future__ import annotations

import errno
import os
import struct
import time

import _cffi_backend

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Tuple

# From <seccomp.h> (libseccomp 2.5): actions, filter attributes, comparison operators.
ACT_ALLOW = 0x7FFF0000
ACT_KILL_PROCESS = 0x80000000     # not the default; the suite passes with it (docs/security.md)
_ACT_ERRNO = 0x00050000
_ATTR_CTL_TSYNC = 4
_ATTR_CTL_LOG = 6
_CMP_EQ = 4
_CMP_MASKED_EQ = 7


def act_errno(err: int) -> int:
    return _ACT_ERRNO | (err & 0xFFFF)


# Every syscall the VMM makes once the guest runs, in the groups of docs/security.md.
ALLOWED = """
    read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 lseek close
    fallocate fdatasync fsync ftruncate
    epoll_create1 epoll_ctl epoll_wait epoll_pwait poll ppoll select pselect6 eventfd2
    futex set_robust_list rseq sched_yield sched_getaffinity sched_getscheduler sched_getparam
    nanosleep clock_nanosleep clock_gettime clock_getres gettimeofday
    rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack restart_syscall
    getpid gettid getuid geteuid getgid getegid getrandom
    exit exit_group
    accept4 recvfrom recvmsg sendto sendmsg shutdown getsockopt setsockopt
    getsockname getpeername
    open openat dup dup2 dup3 fcntl pipe2 fstat newfstatat statx stat lstat
    statfs fstatfs access faccessat faccessat2 readlink readlinkat getcwd getdents64
    rename renameat renameat2 symlink symlinkat mkdir mkdirat unlink unlinkat rmdir flock
    mmap munmap mprotect mremap madvise brk msync uname
""".split()

# ioctl request types ((cmd >> 8) & 0xff) the VMM issues: KVM, ttys and taps ('T'),
# block devices (0x12, a drive's size) and interfaces (0x89, if_nametoindex).
IOCTL_TYPES = (0xAE, 0x54, 0x12, 0x89)
# Threads, not processes: glibc tries clone3 first and falls back to clone on ENOSYS,
# whose flags (unlike clone3's, which sit in memory) the filter can read.
CLONE_THREAD = 0x00010000
# socket(): unix, IPv4 and IPv6 only (if_nametoindex opens one for its ioctl).
SOCKET_FAMILIES = (1, 2, 10)
# Calls that could reach another process: the VMM only ever names itself (pid 0 is
# the calling thread); tgkill's target process is filled in at install.
SELF_ONLY = ("sched_setaffinity", "sched_setscheduler", "prlimit64")

_lib: Dict[str, object] = {}


def _libseccomp() -> Dict[str, object]:
    """The six libseccomp calls used here, typed by hand (see the module docstring)."""
    if not _lib:
        b = _cffi_backend
        so = b.load_library("libseccomp.so.2")
        i32, u32 = b.new_primitive_type("int"), b.new_primitive_type("uint32_t")
        ctx = b.new_pointer_type(b.new_void_type())
        chars = b.new_pointer_type(b.new_primitive_type("char"))
        sigs = {"seccomp_init": ((u32,), ctx), "seccomp_release": ((ctx,), b.new_void_type()),
                "seccomp_syscall_resolve_name": ((chars,), i32),
                "seccomp_rule_add_array": ((ctx, u32, i32, u32, chars), i32),
                "seccomp_attr_set": ((ctx, i32, u32), i32), "seccomp_load": ((ctx,), i32)}
        for name, (args, result) in sigs.items():
            _lib[name] = so.load_function(b.new_function_type(args, result, False), name)
        _lib["buffer"] = b.new_array_type(chars, None)
        _lib["so"] = so         # freeing it would dlclose the library under the pointers
    return _lib


def rules() -> List[Tuple[str, int, List[Tuple[int, int, int, int]]]]:
    """The filter as (syscall, action, [(arg, op, a, b), ...]) rules, one argument test each."""
    out = [(name, ACT_ALLOW, []) for name in ALLOWED]
    out += [("ioctl", ACT_ALLOW, [(1, _CMP_MASKED_EQ, 0xFF00, kind << 8)]) for kind in IOCTL_TYPES]
    out.append(("clone", ACT_ALLOW, [(0, _CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD)]))
    out.append(("clone3", act_errno(errno.ENOSYS), []))
    out += [("socket", ACT_ALLOW, [(0, _CMP_EQ, family, 0)]) for family in SOCKET_FAMILIES]
    out += [(name, ACT_ALLOW, [(0, _CMP_EQ, 0, 0)]) for name in SELF_ONLY]
    out.append(("tgkill", ACT_ALLOW, [(0, _CMP_EQ, os.getpid(), 0)]))
    return out


def install(default_action: int = act_errno(errno.EPERM)) -> float:
    """Load the filter on every thread of the process; returns what it took, in ms.

    Raises OSError when libseccomp is missing or the kernel refuses the filter.
    """
    t0 = time.perf_counter()
    try:
        lib = _libseccomp()
    except OSError as e:
        raise OSError(errno.ENOSYS, f"libseccomp.so.2 cannot be loaded ({e})") from None
    ctx = lib["seccomp_init"](default_action)
    if not ctx:
        raise OSError(errno.EINVAL, "seccomp_init failed")
    try:
        for attr in (_ATTR_CTL_TSYNC, _ATTR_CTL_LOG):
            _check(lib["seccomp_attr_set"](ctx, attr, 1), "seccomp_attr_set")
        for name, action, args in rules():
            nr = lib["seccomp_syscall_resolve_name"](name.encode())
            if nr == -1:        # not a syscall on this architecture
                continue
            # struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a, datum_b; }
            cmps = _cffi_backend.newp(lib["buffer"], b"".join(struct.pack("=IiQQ", *a) for a in args)
                                      or b"\0")
            _check(lib["seccomp_rule_add_array"](ctx, action, nr, len(args), cmps), f"rule for {name}")
        _check(lib["seccomp_load"](ctx), "seccomp_load")
    finally:
        lib["seccomp_release"](ctx)
    return (time.perf_counter() - t0) * 1000


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise OSError(-rc, f"{what}: {errno.errorcode.get(-rc, rc)}")
    if rc > 0:      # TSYNC: a thread that could not take the filter
        raise OSError(errno.EAGAIN, f"{what}: thread {rc} could not be synchronised")
