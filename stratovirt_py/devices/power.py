"""A one-register power controller at port 0x604 (the ACPI PM1a control block's place).

A 16-bit write with SLP_EN (bit 13) set powers the machine off, which ends the
VMM with exit status 0.  Microvm guests have no ACPI, so this is how the test
guests (and any guest that knows the port) power off.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Callable

SLP_EN = 1 << 13


class PowerButton:
    def __init__(self, on_poweroff: Callable[[], None]):
        self._on_poweroff = on_poweroff

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if offset == 0 and value & SLP_EN:
            self._on_poweroff()
