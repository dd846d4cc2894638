"""Every ioctl the project issues goes through ``ioctl()`` here.

The numbers come from <linux/kvm.h> through the cffi module built at install
time (see ``_build.py``); ``lib.KVM_*`` is the only place they are read.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any

from ._kvm_cffi import ffi, lib
from .errors import KvmError

__all__ = ["ffi", "lib", "ioctl", "ioctl_ret"]


def ioctl(fd: int, request: int, arg: Any = 0, name: str = "") -> int:
    """Issue ``request`` on ``fd``; raise KvmError on failure, else return the result.

    ``arg`` is an int or a cffi pointer.  cffi releases the GIL for the call, so a
    vCPU blocked in KVM_RUN does not hold up other threads.
    """
    ret, err = ioctl_ret(fd, request, arg)
    if ret < 0:
        raise KvmError(name or f"ioctl {request:#x}", err)
    return ret


def ioctl_ret(fd: int, request: int, arg: Any = 0) -> "tuple[int, int]":
    """Like ``ioctl`` but returns ``(ret, errno)`` without raising (for KVM_RUN's hot path)."""
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    ret = lib.ioctl(fd, ffi.cast("unsigned long", request), arg)
    return (ret, ffi.errno if ret < 0 else 0)
