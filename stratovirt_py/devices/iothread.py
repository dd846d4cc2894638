"""The I/O thread: one epoll loop on one daemon thread where all device work runs.

vCPU threads never do device work.  A guest kick lands in a queue's eventfd (KVM
ioeventfd), the loop wakes up, and the callback registered for that fd runs here.
Chardev backends register their sockets/ptys the same way.

    io = IoThread("iothread0")
    io.register(fd, callback)          # callback() runs on the I/O thread when fd is readable
    io.call_soon(fn)                   # run fn on the I/O thread (thread-safe)
    io.call_later(0.01, fn)            # ... after a delay (throttling retries)
    io.start(); ...; io.stop()

A callback that raises is logged and the loop carries on: one broken device must not
stop the others.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import threading
import time
from collections import deque

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Callable, Deque, Dict, List, Optional, Tuple
    Callback = Callable[[], None]

from .. import pinning
from ..logs import get_logger

log = get_logger(__name__)



class IoThread:
    def __init__(self, name: str = "iothread"):
        self.name = name
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._handlers: Dict[int, Callback] = {}
        self._soon: Deque[Callback] = deque()
        self._timers: List[Tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # -- registration (any thread) -------------------------------------------
    def register(self, fd: int, callback: Callback, events: int = select.EPOLLIN) -> None:
        with self._lock:
            if fd in self._handlers:
                self._epoll.modify(fd, events)
            else:
                self._epoll.register(fd, events)
            self._handlers[fd] = callback

    def unregister(self, fd: int) -> None:
        with self._lock:
            if self._handlers.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass

    def call_soon(self, fn: Callback) -> None:
        self._soon.append(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callback) -> None:
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + max(0.0, delay), next(self._seq), fn))
        self._wake()

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (BlockingIOError, OSError):
            pass

    @property
    def on_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait for it; registered fds stay registered (not closed)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        if thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        os.close(self._wake_fd)

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued before this call has run (tests, drain)."""
        if self._thread is None or self.on_thread:
            return True
        done = threading.Event()
        self.call_soon(done.set)
        return done.wait(timeout)

    # -- the loop ---------------------------------------------------------------
    def _next_timeout(self) -> float:
        if self._soon:
            return 0.0
        with self._lock:
            if not self._timers:
                return -1.0
            return max(0.0, self._timers[0][0] - time.monotonic())

    def run_once(self, timeout: float = 0.0) -> None:
        """One iteration of the loop (also usable from tests without a thread)."""
        nt = self._next_timeout()
        if nt >= 0 and (timeout < 0 or nt < timeout):
            timeout = nt
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            events = []
        for fd, _mask in events:
            if fd == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            cb = self._handlers.get(fd)
            if cb is not None:
                self._call(cb)
        while self._soon:
            self._call(self._soon.popleft())
        now = time.monotonic()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for fn in due:
            self._call(fn)

    def _call(self, fn: Callback) -> None:
        try:
            fn()
        except Exception:  # a device bug must not kill the loop
            log.exception("%s: callback %r failed", self.name, fn)

    def _run(self) -> None:
        pinning.pin_this_thread()
        while not self._stopping:
            self.run_once(-1.0)
