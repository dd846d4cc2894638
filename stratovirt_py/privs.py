"""Least privilege: once the VM runs, every thread gives up its capabilities and sets
``no_new_privs`` (docs/security.md, "Capabilities").

Capabilities, the bounding set and ``no_new_privs`` belong to each thread, and capset(2)
changes only its caller's, so ``privs.c`` has each thread make the calls itself, from a
handler of ``DROP_SIGNAL`` (glibc applies setuid(2) to all threads the same way).  Done
before the seccomp filter, which allows none of those calls, and off the warm start's
critical path: the compiled module is loaded only here.
"""

from __future__ import annotations

import _signal
import os
import time

# Nothing: see docs/security.md for why a running VMM needs no capability.
KEEP = 0
# The vCPU kick is SIGRTMIN; the next one is free.
DROP_SIGNAL = _signal.SIGRTMIN + 1
TIMEOUT_MS = 2000


def drop() -> float:
    """Drop every capability not in KEEP on every thread; returns what it took, in ms.

    Raises OSError when a thread could not drop them.
    """
    t0 = time.perf_counter()
    from . import _privs_cffi
    err = _privs_cffi.lib.sv_drop_privs_all(KEEP, DROP_SIGNAL, TIMEOUT_MS)
    if err:
        raise OSError(err, os.strerror(err))
    return (time.perf_counter() - t0) * 1000
