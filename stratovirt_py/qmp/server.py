"""The QMP server: listening sockets, connections, and the order of what they see.

One daemon thread runs a ``selectors`` loop over the listening sockets, every
client connection and a wake-up pipe.  Commands run on that thread, one at a time,
so the machine never sees two QMP commands at once.  Events come from any thread
through the ``EventBus``: the subscriber encodes them, queues them and wakes the
loop.  Before a command's reply is queued the event queue is drained, which is what
puts STOP ahead of the ``stop`` reply.

Which clients get events: a client that negotiated (``qmp_capabilities``, as QEMU
clients do) gets them from the negotiation reply on, never before it (qemu.qmp
fails negotiation on an early event).  StratoVirt itself never requires
negotiation, and its documentation shows ``{"execute":"stop"}`` followed by the
STOP event on a connection that did not negotiate, so any other first command turns
events on as well, before it runs.

Fairness and bounds: at most ``BATCH`` messages of one client are handled per loop
turn; a client with unhandled messages or a full output buffer is not read from
until it catches up (a flooding client slows only itself); a client whose output
exceeds ``OUTPUT_LIMIT`` (it never reads its events) is dropped.
"""

from __future__ import annotations

import array
import collections
import os
import select
import selectors
import socket
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple, Union
    from .machine import MachineControl

from ..logs import get_logger
from .address import QmpAddress, parse_qmp_address
from .commands import Dispatcher
from . import listen
from .events import EventBus
from .listen import Listener
from .protocol import (GREETING_LINE, MAX_MESSAGE_BYTES, MessageSplitter, QmpInputError,
                       RequestError, TooLong, describe, encode, error_reply, parse_request,
                       safe_encode)

log = get_logger(__name__)

RECV_SIZE = 64 * 1024
BATCH = 32                         # messages of one client per loop turn
HIGH_WATER = 256 * 1024            # stop reading a client whose replies pile up
OUTPUT_LIMIT = 16 * 1024 * 1024    # drop a client that does not read at all
EVENT_QUEUE_LIMIT = 4096           # events waiting for the QMP thread
MAX_PENDING_FDS = 16               # SCM_RIGHTS fds waiting for a getfd
MAX_CLIENTS = 64
IDLE_EVICT_SECONDS = 5.0           # at MAX_CLIENTS, a client this idle makes room
MAX_BAD_IN_A_ROW = 64              # malformed messages before a client is let go
QUIT_FLUSH_TIMEOUT = 1.0           # how long quit waits for its reply to be sent
CLOSE_FLUSH_TIMEOUT = 0.5          # how long close() lets pending output drain

def _is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


class _Client:
    """One accepted connection and everything buffered for it."""

    def __init__(self, sock: socket.socket, is_unix: bool) -> None:
        self.sock = sock
        self.is_unix = is_unix
        self.splitter = MessageSplitter(MAX_MESSAGE_BYTES)
        self.pending: Deque[Union[bytes, TooLong]] = collections.deque()
        self.outbuf = bytearray()
        self.fds: Deque[int] = collections.deque()
        self.events_on = False
        self.eof = False
        self.closed = False
        self.bad_in_a_row = 0
        self.last_active = time.monotonic()
        self.interest = 0

    def take_fd(self) -> Optional[int]:
        return self.fds.popleft() if self.fds else None


_LISTENER = object()
_WAKE = object()


def _family(address: QmpAddress) -> int:
    if address.kind == "unix":
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in address.host else socket.AF_INET


class QmpServer:
    """QMP over unix and/or TCP sockets for one machine."""

    def __init__(self, machine: MachineControl, events: EventBus,
                 addresses: Sequence[Union[str, QmpAddress]],
                 listeners: Optional[List[Listener]] = None) -> None:
        """``listeners``: the addresses already bound (``listen.bind_all``), served from start()."""
        self._addresses = [a if isinstance(a, QmpAddress) else parse_qmp_address(a)
                           for a in addresses]
        self._dispatcher = Dispatcher(machine)
        self._events = events
        self._lock = threading.Lock()                 # guards _event_queue
        self._event_queue: Deque[bytes] = collections.deque()
        self._bound = listeners
        self._listeners: List[Tuple[socket.socket, Listener]] = []
        self._clients: Dict[int, _Client] = {}
        self._selector: Optional[selectors.BaseSelector] = None
        self._wake_r = self._wake_w = -1
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind every address (so clients can connect once this returns) and serve."""
        if self._selector is not None or self._closed:
            raise RuntimeError("QmpServer.start() called twice")
        bound = self._bound if self._bound is not None else listen.bind_all(self._addresses)
        self._bound = None
        for listener in bound:
            address = listener.address
            if address.kind == "tcp" and not _is_loopback(address.host):
                log.warning("QMP listens on %s, which is not a loopback address: QMP has no "
                            "authentication, anyone who can reach it controls the VM", address)
            family = _family(address)
            self._listeners.append((socket.socket(family, socket.SOCK_STREAM, fileno=listener.fd),
                                    listener))
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        for sock, listener in self._listeners:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, (_LISTENER, listener.address))
        self._events.subscribe(self._on_event)
        self._thread = threading.Thread(target=self._run, name="qmp", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving: flush what is queued (briefly), close sockets, remove files."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        thread = self._thread
        if thread is None:
            for listener in self._bound or ():
                listener.close()
            self._bound = None
            self._close_listeners()
            return
        self._wake()
        if thread is threading.current_thread():
            return  # called from a command (quit): the loop cleans up when it returns
        thread.join(timeout=5)
        if thread.is_alive():
            log.error("QMP thread did not stop within 5 s")

    def __enter__(self) -> "QmpServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def bound_addresses(self) -> List[str]:
        """The addresses actually listened on (a TCP port 0 shows the chosen port)."""
        result = []
        for sock, listener in self._listeners:
            address = listener.address
            if address.kind == "tcp":
                address = QmpAddress("tcp", host=address.host, port=sock.getsockname()[1])
            result.append(str(address))
        return result

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def _close_listeners(self) -> None:
        for sock, listener in self._listeners:
            sock.detach()           # the Listener owns the descriptor
            listener.close()
        self._listeners = []

    # ------------------------------------------------------------------ events
    def _on_event(self, event: Dict[str, Any]) -> None:
        """EventBus subscriber; runs on the emitting thread, so it only queues."""
        try:
            line = encode(event)
        except (TypeError, ValueError):
            log.exception("QMP event %r cannot be encoded; dropped", event.get("event"))
            return
        with self._lock:
            if len(self._event_queue) >= EVENT_QUEUE_LIMIT:
                dropped = self._event_queue.popleft()
                log.warning("QMP event queue full; dropped %s", describe(dropped, 80))
            self._event_queue.append(line)
        self._wake()

    def _wake(self) -> None:
        # Under the lock so that a late wake-up never writes to a closed (and maybe
        # reused) descriptor number.
        with self._lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass  # the pipe is full: a wake-up is pending anyway

    def _deliver_events(self) -> None:
        with self._lock:
            lines = list(self._event_queue)
            self._event_queue.clear()
        if not lines:
            return
        for client in list(self._clients.values()):
            if client.events_on and not client.closed:
                for line in lines:
                    self._queue(client, line)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping:
                # Poll only for clients that can make progress now: one whose replies
                # are at the high-water mark waits for EVENT_WRITE like any other fd.
                busy = any(self._can_process(c) for c in self._clients.values())
                for key, mask in self._selector.select(0 if busy else None):
                    if key.data is _WAKE:
                        self._drain_wake()
                    elif isinstance(key.data, tuple):
                        self._accept(key.fileobj, key.data[1])  # type: ignore[arg-type]
                    else:
                        client = key.data
                        if mask & selectors.EVENT_WRITE:
                            self._flush(client)
                        if mask & selectors.EVENT_READ and not client.closed:
                            self._read(client)
                self._deliver_events()
                for client in list(self._clients.values()):
                    self._process(client)
                for client in list(self._clients.values()):
                    self._update_interest(client)
        except Exception:  # noqa: BLE001 - log why QMP died instead of dying silently
            log.exception("QMP server loop failed")
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self, listener: socket.socket, address: QmpAddress) -> None:
        try:
            sock, _peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:  # EMFILE and friends: keep serving the others
            log.warning("QMP accept on %s failed: %s", address, err)
            return
        if len(self._clients) >= MAX_CLIENTS and not self._evict_idle():
            log.warning("QMP: more than %d clients; refusing one on %s", MAX_CLIENTS, address)
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock, address.kind == "unix")
        self._clients[sock.fileno()] = client
        client.outbuf += GREETING_LINE
        log.debug("QMP client connected on %s", address)
        self._flush(client)

    def _evict_idle(self) -> bool:
        """Close the longest-idle client to make room, if it has been idle a while.

        Connections left open and forgotten (or opened on purpose) would otherwise lock
        the orchestrator out; one that is talking is never closed for a newcomer.
        """
        idle = min(self._clients.values(), key=lambda c: c.last_active)
        if time.monotonic() - idle.last_active < IDLE_EVICT_SECONDS or idle.pending or idle.outbuf:
            return False
        log.warning("QMP: %d clients; closing the one idle longest to make room", MAX_CLIENTS)
        self._drop(idle)
        return True

    def _read(self, client: _Client) -> None:
        try:
            if client.is_unix:
                data, ancdata, msg_flags, _addr = client.sock.recvmsg(
                    RECV_SIZE, socket.CMSG_SPACE(MAX_PENDING_FDS * 4), socket.MSG_CMSG_CLOEXEC)
                self._take_fds(client, ancdata, msg_flags)
            else:
                data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.debug("QMP client read failed: %s", err)
            self._drop(client)
            return
        if not data:
            # EOF: the client may have only shut down its sending side (``echo ... |
            # ncat -U``); answer what it sent, then close once the replies are out.
            client.eof = True
            client.pending.extend(client.splitter.feed(b"\n"))
            return
        client.last_active = time.monotonic()
        client.pending.extend(client.splitter.feed(data))

    def _take_fds(self, client: _Client, ancdata: List[Tuple[int, int, bytes]],
                  msg_flags: int) -> None:
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array("i")
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                if len(client.fds) < MAX_PENDING_FDS:
                    client.fds.append(fd)
                else:
                    os.close(fd)
        if msg_flags & socket.MSG_CTRUNC:
            log.warning("QMP client passed more fds than %d; extra ones dropped",
                        MAX_PENDING_FDS)

    @staticmethod
    def _can_process(client: _Client) -> bool:
        return bool(client.pending) and not client.closed and len(client.outbuf) < HIGH_WATER

    def _process(self, client: _Client) -> None:
        handled = 0
        while self._can_process(client) and handled < BATCH and not self._stopping:
            self._handle(client, client.pending.popleft())
            handled += 1
        if client.eof and not client.pending and not client.outbuf and not client.closed:
            self._drop(client)

    def _handle(self, client: _Client, raw: Union[bytes, TooLong]) -> None:
        if isinstance(raw, TooLong):
            self._bad_input(client, encode(error_reply(QmpInputError(raw.reason()))))
            return
        try:
            request = parse_request(raw)
        except RequestError as err:
            log.info("QMP: bad input %s: %s", describe(raw), err)
            self._bad_input(client, safe_encode(error_reply(err, "GenericError",
                                                            err.msg_id, err.has_id)))
            return
        client.bad_in_a_row = 0
        log.info("QMP: --> %s", describe(raw))
        negotiating = request.command == "qmp_capabilities"
        if not negotiating:
            client.events_on = True
        outcome = self._dispatcher.dispatch(request, client.take_fd)
        self._deliver_events()  # events the command caused go out before its reply
        line = safe_encode(outcome.reply)
        log.info("QMP: <-- %s", describe(line))
        self._queue(client, line)
        if negotiating and "return" in outcome.reply:
            client.events_on = True
        if outcome.after_reply is not None:
            self._flush_blocking([client], QUIT_FLUSH_TIMEOUT)
            try:
                outcome.after_reply()
            except Exception:  # noqa: BLE001 - same rule as commands
                log.exception("QMP: %s failed after its reply", request.command)
            self._deliver_events()
            self._flush_blocking(list(self._clients.values()), CLOSE_FLUSH_TIMEOUT)

    def _bad_input(self, client: _Client, line: bytes) -> None:
        """Answer one malformed message; a client sending nothing else is let go, since
        ``[][][]...`` would otherwise cost a parse and a reply every two bytes."""
        self._queue(client, line)
        client.bad_in_a_row += 1
        if client.bad_in_a_row >= MAX_BAD_IN_A_ROW:
            log.warning("QMP: %d malformed messages in a row; closing the connection",
                        MAX_BAD_IN_A_ROW)
            err = QmpInputError(f"{MAX_BAD_IN_A_ROW} malformed messages in a row; "
                                "closing the connection")
            self._queue(client, encode(error_reply(err)))
            client.pending.clear()
            client.eof = True          # no more reading; dropped once the replies are out

    # ------------------------------------------------------------------ output
    def _queue(self, client: _Client, line: bytes) -> None:
        if client.closed:
            return
        client.outbuf += line
        if len(client.outbuf) > OUTPUT_LIMIT:
            log.warning("QMP client does not read its replies/events; disconnecting it")
            self._drop(client)

    def _flush(self, client: _Client) -> None:
        while client.outbuf and not client.closed:
            try:
                sent = client.sock.send(client.outbuf[:RECV_SIZE], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EPIPE/ECONNRESET: the client went away
                log.debug("QMP client write failed: %s", err)
                self._drop(client)
                return
            del client.outbuf[:sent]

    def _flush_blocking(self, clients: List[_Client], timeout: float) -> None:
        """Send the clients' buffers, waiting up to ``timeout`` s for slow readers."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = []
            for client in clients:
                self._flush(client)
                if client.outbuf and not client.closed:
                    waiting.append(client)
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return
            try:
                select.select([], [c.sock for c in waiting], [], left)
            except (OSError, ValueError):
                return

    def _update_interest(self, client: _Client) -> None:
        if client.closed or self._selector is None:
            return
        wanted = 0
        if not client.eof and not client.pending and len(client.outbuf) < HIGH_WATER:
            wanted |= selectors.EVENT_READ
        if client.outbuf:
            wanted |= selectors.EVENT_WRITE
        if wanted == client.interest:
            return
        if client.interest == 0:
            self._selector.register(client.sock, wanted, client)
        elif wanted == 0:
            self._selector.unregister(client.sock)
        else:
            self._selector.modify(client.sock, wanted, client)
        client.interest = wanted

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        if client.interest and self._selector is not None:
            try:
                self._selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        self._clients.pop(client.sock.fileno(), None)
        for fd in client.fds:  # passed but never claimed by getfd
            os.close(fd)
        client.fds.clear()
        client.pending.clear()
        client.outbuf.clear()
        client.sock.close()
        log.debug("QMP client disconnected")

    def _shutdown(self) -> None:
        self._events.unsubscribe(self._on_event)
        try:
            self._deliver_events()
            self._flush_blocking(list(self._clients.values()), CLOSE_FLUSH_TIMEOUT)
        finally:
            for client in list(self._clients.values()):
                self._drop(client)
            self._close_listeners()
            if self._selector is not None:
                self._selector.close()
            with self._lock:
                for fd in (self._wake_r, self._wake_w):
                    if fd >= 0:
                        os.close(fd)
                self._wake_r = self._wake_w = -1
