"""Port-I/O and MMIO buses: route a guest access to the device that owns the address.

A bus device implements ``read(offset, size) -> bytes`` and ``write(offset, data)``
where ``offset`` is relative to the base it was registered at.  Accesses to
addresses nobody owns read as all-ones and writes are dropped, like real hardware.
"""

from __future__ import annotations

import bisect
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import List, Optional, Protocol, Tuple

from ..errors import ConfigError

if TYPE_CHECKING:
    class BusDevice(Protocol):
        def read(self, offset: int, size: int) -> bytes: ...

        def write(self, offset: int, data: bytes) -> None: ...


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._starts: List[int] = []
        self._entries: List[Tuple[int, int, BusDevice]] = []
        self._lock = threading.Lock()

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        with self._lock:
            for start, ln, _ in self._entries:
                if base < start + ln and start < base + length:
                    raise ConfigError(
                        f"{self.name} range {base:#x}+{length:#x} overlaps {start:#x}+{ln:#x}")
            i = bisect.bisect(self._starts, base)
            self._starts.insert(i, base)
            self._entries.insert(i, (base, length, device))

    def remove(self, base: int) -> None:
        with self._lock:
            i = self._starts.index(base)
            del self._starts[i]
            del self._entries[i]

    def find(self, addr: int) -> Optional[Tuple[int, BusDevice]]:
        i = bisect.bisect(self._starts, addr) - 1
        if i < 0:
            return None
        start, length, dev = self._entries[i]
        if addr < start + length:
            return start, dev
        return None

    def read(self, addr: int, size: int) -> bytes:
        hit = self.find(addr)
        if hit is None:
            return b"\xff" * size
        base, dev = hit
        return dev.read(addr - base, size)

    def write(self, addr: int, data: bytes) -> bool:
        hit = self.find(addr)
        if hit is None:
            return False
        base, dev = hit
        dev.write(addr - base, data)
        return True
