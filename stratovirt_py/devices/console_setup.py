"""Connect the serial port to the backend chosen with ``-serial``."""

from __future__ import annotations

from .chardev import CharBackend, create_chardev


def serial_backend(vmm) -> CharBackend:
    """The chardev behind COM1; closed with the VM."""
    s = vmm.cfg.serial
    if s.kind == "chardev":
        ch = vmm.cfg.chardevs[s.chardev]
        backend = create_chardev(ch.backend, ch.id, ch.path, server=ch.server, nowait=ch.nowait)
    elif s.kind == "none":
        backend = CharBackend("serial0")
    else:
        backend = create_chardev(s.kind, "serial0", s.path, server=True, nowait=True)
    vmm.cleanups.append(backend.close)
    return backend
