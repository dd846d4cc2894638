"""The QMP event bus: the machine emits, every QMP connection listens.

vCPU threads, the I/O thread and the QMP thread all emit events, so ``emit`` is
thread-safe.  Subscribers are called synchronously, in subscription order, while the
bus lock is held: that gives every subscriber the same total order of events (two
threads emitting at once cannot interleave differently for two clients), at the price
that a subscriber must be quick and must not block.  The QMP server's subscriber only
encodes the event and queues it for its own thread.
"""

from __future__ import annotations

import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Callable, Dict, List, Optional
    Event = Dict[str, Any]
    Subscriber = Callable[[Event], None]

from ..logs import get_logger

log = get_logger(__name__)



def timestamp(now: Optional[float] = None) -> Dict[str, int]:
    """QMP's wall-clock timestamp ``{"seconds": S, "microseconds": U}``."""
    if now is None:
        now = time.time()
    micros_total = int(now * 1_000_000)
    return {"seconds": micros_total // 1_000_000, "microseconds": micros_total % 1_000_000}


class EventBus:
    """Fan-out of QMP events to subscribers (the QMP server, tests, loggers)."""

    def __init__(self) -> None:
        # Re-entrant so that a subscriber that emits (or unsubscribes) does not deadlock.
        self._lock = threading.RLock()
        self._subscribers: List[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(event)`` for every event emitted from now on."""
        with self._lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        """Stop calling ``callback``; unknown callbacks are ignored."""
        with self._lock:
            try:
                self._subscribers.remove(callback)
            except ValueError:
                pass

    def emit(self, name: str, data: Optional[Dict[str, Any]] = None) -> Event:
        """Stamp and deliver ``{"event": name, "data": data, "timestamp": ...}``.

        StratoVirt always sends a ``data`` member (``{}`` for STOP and RESUME), so a
        missing ``data`` becomes ``{}``.  A failing subscriber is logged and skipped:
        an event must never take down the vCPU thread that emitted it.
        """
        with self._lock:
            event: Event = {
                "event": name,
                "data": dict(data) if data else {},
                "timestamp": timestamp(),
            }
            for callback in list(self._subscribers):
                try:
                    callback(event)
                except Exception:  # noqa: BLE001 - see docstring
                    log.exception("QMP event subscriber %r failed on %s", callback, name)
        return event
