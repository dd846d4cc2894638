"""Logging that costs nothing on the way to a running vCPU.

The standard ``logging`` package (with traceback, string, weakref) takes a few
milliseconds to import: too much before a restored guest runs.  Modules log through
``get_logger(name)``.  Between ``configure()`` (the CLI, first thing) and
``start()`` (right after the vCPUs run) records at or above the configured level
are kept with their time; ``start()`` imports ``logging``, installs the handler and
replays them.  Outside that window (unit tests, the pool) records go straight to
``logging``.
"""

from __future__ import annotations

import sys
import threading
import time

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_lock = threading.Lock()
_pending: list = []       # (name, level, msg, args, exc_info, created)
_buffering = False
_threshold = WARNING
_stream = None            # where start() sends records (None: stderr)


class Logger:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def _log(self, level: int, msg: str, args: tuple, exc_info) -> None:
        if _buffering:
            if level < _threshold:
                return
            if exc_info is True:
                exc_info = sys.exc_info()
            with _lock:
                if _buffering:
                    _pending.append((self.name, level, msg, args, exc_info or None, time.time()))
                    return
        import logging
        logging.getLogger(self.name).log(level, msg, *args, exc_info=exc_info)

    def debug(self, msg: str, *args, exc_info=False) -> None:
        self._log(DEBUG, msg, args, exc_info)

    def info(self, msg: str, *args, exc_info=False) -> None:
        self._log(INFO, msg, args, exc_info)

    def warning(self, msg: str, *args, exc_info=False) -> None:
        self._log(WARNING, msg, args, exc_info)

    def error(self, msg: str, *args, exc_info=False) -> None:
        self._log(ERROR, msg, args, exc_info)

    def exception(self, msg: str, *args) -> None:
        self._log(ERROR, msg, args, True)


def get_logger(name: str) -> Logger:
    return Logger(name)


def configure(verbose: bool, stream=None) -> None:
    """Keep records of INFO (``verbose``) or WARNING and up until ``start()``; ``stream`` is an open file or None for stderr."""
    global _buffering, _threshold, _stream
    _threshold = INFO if verbose else WARNING
    _stream = stream
    _buffering = True


def start() -> None:
    """Install the handler on the root logger and replay what was kept."""
    global _buffering
    if not _buffering:
        return
    import logging
    handler = logging.StreamHandler(_stream if _stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_threshold)
    with _lock:
        kept = _pending[:]
        _pending.clear()
        _buffering = False
    for name, level, msg, args, exc_info, created in kept:
        logger = logging.getLogger(name)
        if not logger.isEnabledFor(level):
            continue
        rec = logger.makeRecord(name, level, "(kept)", 0, msg, args, exc_info)
        rec.created = created
        rec.msecs = (created - int(created)) * 1000
        logger.handle(rec)
