"""Connect the serial port to the backend chosen with ``-serial``."""

from __future__ import annotations

import os
import sys
import termios
import threading
import tty
from typing import Callable

from ..errors import ConfigError


def serial_output(vmm) -> Callable[[bytes], None]:
    s = vmm.cfg.serial
    if s.kind == "none":
        return lambda data: None
    if s.kind == "stdio":
        _attach_stdin(vmm)
        return lambda data: os.write(1, data)
    if s.kind == "file":
        try:
            fd = os.open(s.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"-serial file: cannot open {s.path}: {e.strerror}") from None
        vmm.cleanups.append(lambda: os.close(fd))
        return lambda data: os.write(fd, data)
    raise ConfigError(f"-serial {s.kind} is not available yet")


def _attach_stdin(vmm) -> None:
    fd = 0
    try:
        os.fstat(fd)
    except OSError:
        return
    if os.isatty(fd):
        saved = termios.tcgetattr(fd)
        tty.setraw(fd)
        vmm.cleanups.append(lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved))

    def reader() -> None:
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            if vmm.serial is not None:
                vmm.serial.enqueue_input(data)

    threading.Thread(target=reader, name="serial-stdin", daemon=True).start()
