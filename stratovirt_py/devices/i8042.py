"""Just enough of the i8042 keyboard controller: the reset line and Ctrl+Alt+Del.

Linux (``reboot=k``) and the test guests reset the machine by pulsing the CPU reset
line through command 0xFE on port 0x64; a microVM ends there.  ``powerdown``
injects Ctrl+Alt+Del scancodes so a guest can shut down in an orderly way.
"""

from __future__ import annotations

import threading
from collections import deque

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Callable

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_SELF_TEST = 0xAA
CMD_RESET_CPU = 0xFE
STATUS_OBF = 0x01
STATUS_SYS = 0x04
STATUS_UNLOCKED = 0x10   # "keyboard not inhibited": Linux warns of a keylock without it
CTR_KBD_INT = 0x01
# Set-1 scancodes: Ctrl down, Alt down, Del down, Del up, Alt up, Ctrl up.
CTRL_ALT_DEL = (0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D)


class I8042:
    """Registered at port 0x60 with length 5 (0x60..0x64)."""

    def __init__(self, on_reset: Callable[[], None], set_irq: Callable[[int], None]):
        self._on_reset = on_reset
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self._buf: deque = deque()
        self._ctr = CTR_KBD_INT | STATUS_SYS
        self._expect_ctr = False

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset == 4:
                value = STATUS_SYS | STATUS_UNLOCKED | (STATUS_OBF if self._buf else 0)
            elif offset == 0:
                value = self._buf.popleft() if self._buf else 0
                self._pulse()
            else:
                value = 0
        return bytes([value]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0] if data else 0
        reset = False
        with self._lock:
            if offset == 4:
                if value == CMD_RESET_CPU:
                    reset = True
                elif value == CMD_READ_CTR:
                    self._buf.append(self._ctr)
                elif value == CMD_WRITE_CTR:
                    self._expect_ctr = True
                elif value == CMD_SELF_TEST:
                    self._buf.append(0x55)
            elif offset == 0 and self._expect_ctr:
                self._ctr = value
                self._expect_ctr = False
        if reset:
            self._on_reset()

    def send_ctrl_alt_del(self) -> None:
        with self._lock:
            self._buf.extend(CTRL_ALT_DEL)
            self._pulse()

    def _pulse(self) -> None:
        if self._buf and self._ctr & CTR_KBD_INT:
            self._set_irq(1)
            self._set_irq(0)
