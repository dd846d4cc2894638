"""A token bucket for I/O throttling (``throttling.iops-total``)."""

from __future__ import annotations

import time


class TokenBucket:
    """``rate`` operations per second, bursts up to one second's worth."""

    def __init__(self, rate: int):
        self.rate = float(rate)
        self.tokens = float(rate)
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def delay(self) -> float:
        return max(0.001, (1.0 - self.tokens) / self.rate)
