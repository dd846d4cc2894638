"""The I/O thread: fd callbacks, call_soon/call_later, error containment, unregister."""

import os
import threading
import time

from stratovirt_py.devices.iothread import IoThread


def test_fd_callbacks_and_calls():
    io = IoThread("t")
    io.start()
    try:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        seen = []
        got = threading.Event()

        def on_fd():
            seen.append((os.eventfd_read(fd), threading.current_thread().name))
            got.set()
        io.register(fd, on_fd)
        os.eventfd_write(fd, 3)
        assert got.wait(2)
        assert seen == [(3, "t")]
        soon = threading.Event()
        io.call_soon(soon.set)
        assert soon.wait(2)
        later = threading.Event()
        t0 = time.monotonic()
        io.call_later(0.05, later.set)
        assert later.wait(2) and time.monotonic() - t0 >= 0.04
        io.unregister(fd)
        got.clear()
        os.eventfd_write(fd, 1)
        assert io.sync()
        assert not got.wait(0.05)
        os.close(fd)
    finally:
        io.stop()


def test_failing_callback_does_not_stop_the_loop(caplog):
    io = IoThread("t2")
    io.start()
    try:
        io.call_soon(lambda: 1 / 0)
        ok = threading.Event()
        io.call_soon(ok.set)
        assert ok.wait(2)
        assert "ZeroDivisionError" in caplog.text
    finally:
        io.stop()


def test_stop_and_restart():
    io = IoThread("t3")
    io.start()
    io.stop()
    io.start()
    ev = threading.Event()
    io.call_soon(ev.set)
    assert ev.wait(2)
    io.close()


def test_realtime_only_when_confined_to_one_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "sched_setscheduler", lambda pid, policy, param: calls.append(
        (pid, policy, param.sched_priority)))
    for cpus, env, expect in (({0, 1}, "on", []),
                              ({1}, "on", [(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, 1)]),
                              ({1}, "off", [])):
        calls.clear()
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cpus=cpus: set(cpus))
        monkeypatch.setenv("STRATOVIRT_IOTHREAD_RT", env)
        io = IoThread("rt")
        io.start()
        try:
            assert io.sync(2)
        finally:
            io.close()
        assert calls == expect, (cpus, env)


def test_realtime_refused_keeps_running(monkeypatch):
    def refuse(pid, policy, param):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    io = IoThread("rt")
    io.start()
    try:
        done = threading.Event()
        io.call_soon(done.set)
        assert done.wait(2)
    finally:
        io.close()
