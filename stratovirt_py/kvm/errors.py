"""The kvm layer's one error type."""

from __future__ import annotations

import errno as _errno
import os

from ..errors import VmmError


class KvmError(VmmError):
    """An ioctl on /dev/kvm or one of its file descriptors failed."""

    def __init__(self, op: str, err: int, detail: str = ""):
        self.op = op
        self.errno = err
        msg = f"{op} failed: {os.strerror(err)} (errno {_errno.errorcode.get(err, err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
