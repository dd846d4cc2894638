"""virtio-rng (virtio 1.x "Entropy Device"): one request queue of device-writable buffers.

Each buffer is filled with bytes read from the host source (``-object rng-random,
filename=/dev/random`` by default).  ``max_bytes`` per ``period_ms`` limits the rate, as
StratoVirt's ``max-bytes``/``period``: once the budget of a period is spent the device
stops taking buffers until the next period starts.  A source that has nothing to give
right now (EAGAIN) completes the buffer with 0 bytes; the driver asks again.
"""

from __future__ import annotations

import errno
import os
import time
from ...logs import get_logger
from ...record import record
from typing import ClassVar, Optional

from ...errors import DeviceError
from .device import COMMON_FEATURES, VIRTIO_ID_RNG, VirtioDevice

log = get_logger(__name__)

QUEUE_SIZE = 256
MAX_READ = 64 * 1024  # bytes read per request at most


@record(frozen=True)
class RngState:
    VERSION: ClassVar[int] = 1
    path: str

    FIELDS: ClassVar[dict] = {"path": ("str", 4096)}


class Rng(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_RNG
    NAME = "virtio-rng"
    QUEUE_SIZES = (QUEUE_SIZE,)

    def __init__(self, path: str = "/dev/random", max_bytes: Optional[int] = None,
                 period_ms: int = 1000, id: Optional[str] = None):
        super().__init__(id)
        if max_bytes is not None and (max_bytes <= 0 or period_ms <= 0):
            raise DeviceError(f"rng {path}: max-bytes and period must be positive")
        self.path = path
        self.max_bytes = max_bytes
        self.period = period_ms / 1000.0
        self._window_start = time.monotonic()
        self._window_used = 0
        self._retry_pending = False
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DeviceError(f"rng source {path} does not exist") from None
        except OSError as e:
            raise DeviceError(f"cannot open rng source {path}: {e.strerror}") from None

    def features(self) -> int:
        return COMMON_FEATURES

    def reset(self) -> None:
        super().reset()
        self._retry_pending = False

    def _budget(self) -> int:
        if self.max_bytes is None:
            return MAX_READ
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._window_start, self._window_used = now, 0
        return min(MAX_READ, self.max_bytes - self._window_used)

    def process_queue(self, index: int) -> None:
        q = self.queues[index]
        added = 0
        try:
            while True:
                while q.pending():
                    budget = self._budget()
                    if budget <= 0:
                        self._retry_later(index)
                        return
                    chain = q.pop()
                    q.add_used(chain.head, self._fill(chain, budget))
                    added += 1
                if not q.enable_notification():
                    break
        finally:
            if added:
                self.signal_used(index)

    def _fill(self, chain, budget: int) -> int:
        want = min(chain.writable_len, budget)
        if want == 0:
            return 0
        try:
            data = os.read(self.fd, want)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                log.warning("%s: reading %s failed: %s", self.id, self.path, e.strerror)
            return 0
        self._window_used += len(data)
        return chain.write(0, data)

    def _retry_later(self, index: int) -> None:
        if self._retry_pending:
            return
        self._retry_pending = True
        delay = max(0.001, self._window_start + self.period - time.monotonic())

        def retry() -> None:
            self._retry_pending = False
            if self.queues:
                self.process_queue(index)
        self.call_later(delay, retry)

    def drain(self) -> None:
        self._retry_pending = False  # a retry dropped while paused; resume() re-runs the queue

    def save(self) -> RngState:
        return RngState(path=self.path)

    def restore(self, state: RngState) -> None:
        """Nothing to check: the entropy source may differ between save and restore."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
