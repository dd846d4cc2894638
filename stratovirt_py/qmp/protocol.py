"""QMP wire format: framing, request parsing, reply encoding.

Framing.  StratoVirt's documentation shows one JSON object per line (``ncat -U``),
but QEMU's own Python client (``qemu.qmp``) writes each command *without* a newline.
So a message ends at whichever comes first: the brace that closes the top-level
object, or a newline.  A newline always ends a message, even an unfinished one; that
way a malformed line costs the client one error reply and the next line parses
again.  A message is at most ``MAX_MESSAGE_BYTES``; a longer one is skipped (without
being stored) up to its end and answered with one error.

Output.  Compact JSON (``{"return":{}}``, as StratoVirt's serde_json writes it),
each line ended by ``\\r\\n`` exactly as StratoVirt's socket code does.
"""

from __future__ import annotations

import json
import re
from ..record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Dict, List, Optional, Union

from ..errors import VmmError

#: StratoVirt (socket.rs ``send_str``, qmp_channel.rs events) ends every line with CRLF.
LINE_END = b"\r\n"
MAX_MESSAGE_BYTES = 1 << 20
# No command nests deeper than a few levels; a bound lets the splitter skip bracket
# floods (``[[[[...``) at memchr speed instead of one Python step per bracket.
MAX_NESTING = 64

# The greeting carries both version objects: the documentation shows "StratoVirt",
# StratoVirt's code and Kata's govmm need "qemu" (govmm picks blockdev-add's
# argument format from qemu.major, and refuses a greeting without it).
QEMU_VERSION = {"micro": 1, "minor": 0, "major": 5}
STRATOVIRT_VERSION = {"micro": 1, "minor": 0, "major": 0}


def version_info() -> Dict[str, Any]:
    """The ``version`` object of the greeting, also the reply of ``query-version``."""
    return {"qemu": dict(QEMU_VERSION), "StratoVirt": dict(STRATOVIRT_VERSION), "package": ""}


def greeting() -> Dict[str, Any]:
    return {"QMP": {"version": version_info(), "capabilities": []}}


def encode(message: Dict[str, Any]) -> bytes:
    """One QMP line.  Raises ValueError/TypeError for data JSON cannot carry."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + LINE_END


GREETING_LINE = encode(greeting())


class QmpInputError(VmmError):
    """A request that is not a well-formed QMP command (GenericError)."""


class CommandNotFound(VmmError):
    """The request names a command this server does not have."""

    qmp_class = "CommandNotFound"


def error_reply(err: BaseException, qmp_class: str = "GenericError",
                msg_id: Any = None, has_id: bool = False) -> Dict[str, Any]:
    """``{"error": {"class", "desc"}}`` (plus ``id``) for ``err``."""
    reply: Dict[str, Any] = {"error": {"class": qmp_class, "desc": str(err)}}
    if has_id:
        reply["id"] = msg_id
    return reply


# --------------------------------------------------------------------------- framing

class TooLong:
    """Stands in for a message over the size or nesting limit, dropped unread."""

    def __init__(self, size: int, too_deep: bool = False) -> None:
        self.size = size
        self.too_deep = too_deep

    def reason(self, limit: int = MAX_MESSAGE_BYTES) -> str:
        if self.too_deep:
            return f"QMP message nested more than {MAX_NESTING} levels deep"
        return f"QMP message too long ({self.size} bytes; the limit is {limit} bytes)"


# Bytes that change the splitter's state; everything else is copied in bulk.  UTF-8
# continuation bytes are all >= 0x80, so scanning bytes is safe for any text.
_OUTSIDE_STRING = re.compile(rb'[\n"{}\[\]]')
_INSIDE_STRING = re.compile(rb'[\n"\\]')
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")


class MessageSplitter:
    """Cuts a byte stream into QMP messages (see the module docstring)."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._limit = limit
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._size = 0            # bytes seen in this message, stored or not
        self._started = False
        self._structured = False  # began with '{' or '[' (else: ends only at newline)
        self._depth = 0
        self._in_string = False
        self._escape = False      # the previous chunk ended with a backslash in a string
        self._too_deep = False    # over MAX_NESTING: skipped up to the newline

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message held (for tests: stays bounded)."""
        return len(self._buf)

    def _take(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._size <= self._limit and not self._too_deep:
            self._buf += data[start:end]
        elif self._buf:
            self._buf = bytearray()  # over the limit: stop storing, keep counting

    def _finish(self, out: List[Union[bytes, TooLong]]) -> None:
        if self._size > self._limit or self._too_deep:
            out.append(TooLong(self._size, self._too_deep))
        else:
            text = bytes(self._buf).strip()
            if text:
                out.append(text)
        self._reset()

    def feed(self, data: bytes) -> List[Union[bytes, TooLong]]:
        """Consume ``data``; return the messages it completed, in order."""
        out: List[Union[bytes, TooLong]] = []
        pos, end = 0, len(data)
        while pos < end:
            if not self._started:
                m = _NOT_SPACE.search(data, pos)
                if m is None:
                    break
                pos = m.start()
                self._started = True
                self._structured = data[pos] in b"{["
            if self._escape:
                self._escape = False
                if data[pos] != 0x0A:      # an escaped newline still ends the line
                    self._take(data, pos, pos + 1)
                    pos += 1
                continue
            if not self._structured:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._take(data, pos, end)
                    break
                self._take(data, pos, nl)
                pos = nl + 1
                self._finish(out)
                continue
            m = (_INSIDE_STRING if self._in_string else _OUTSIDE_STRING).search(data, pos)
            if m is None:
                self._take(data, pos, end)
                break
            i = m.start()
            ch = data[i]
            if ch == 0x0A:  # newline: the message ends here, finished or not
                self._take(data, pos, i)
                pos = i + 1
                self._finish(out)
                continue
            self._take(data, pos, i + 1)
            pos = i + 1
            if self._in_string:
                if ch == 0x22:    # "
                    self._in_string = False
                elif ch == 0x5C:  # backslash: the next byte is escaped
                    if pos < end:
                        if data[pos] != 0x0A:
                            self._take(data, pos, pos + 1)
                            pos += 1
                    else:
                        self._escape = True
            elif ch == 0x22:
                self._in_string = True
            elif ch in b"{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    # From here the message only ends at a newline, found with find().
                    self._too_deep = True
                    self._structured = False
                    self._buf = bytearray()
            else:  # '}' or ']'
                self._depth -= 1
                if self._depth <= 0:
                    self._finish(out)
        return out


# --------------------------------------------------------------------------- requests

@record
class Request:
    """A syntactically valid QMP command (arguments not yet checked)."""

    command: str
    arguments: Dict[str, Any] = field(default_factory=dict)
    msg_id: Any = None
    has_id: bool = False

    def reply(self, value: Any) -> Dict[str, Any]:
        reply: Dict[str, Any] = {"return": value}
        if self.has_id:
            reply["id"] = self.msg_id
        return reply


class RequestError(QmpInputError):
    """QmpInputError that still knows the request's ``id`` (to echo it)."""

    def __init__(self, desc: str, msg_id: Any = None, has_id: bool = False) -> None:
        super().__init__(desc)
        self.msg_id = msg_id
        self.has_id = has_id


def shown(name: str) -> str:
    """A client-chosen name as error messages and logs echo it: a JSON escape can put a
    newline or a terminal escape in a name, which would forge log lines."""
    return name if name.isprintable() else ascii(name)[1:-1]


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; Python's parser would accept them by default.
    raise ValueError(f"invalid JSON value {name}")


def parse_request(raw: bytes) -> Request:
    """Decode one framed message into a ``Request``; RequestError says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"QMP input is not valid UTF-8 (byte {err.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise RequestError(f"JSON parse error, {err.msg} at column {err.colno}") from None
    except (ValueError, RecursionError) as err:
        raise RequestError(f"JSON parse error, {err}") from None
    if not isinstance(obj, dict):
        raise RequestError("QMP input must be a JSON object")
    has_id = "id" in obj
    msg_id = obj.get("id")
    for key in obj:
        if key not in ("execute", "arguments", "id"):
            raise RequestError(f"QMP input member '{shown(key)}' is unexpected", msg_id, has_id)
    if "execute" not in obj:
        raise RequestError("QMP input lacks member 'execute'", msg_id, has_id)
    command = obj["execute"]
    if not isinstance(command, str):
        raise RequestError("QMP input member 'execute' must be a string", msg_id, has_id)
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        raise RequestError("QMP input member 'arguments' must be an object", msg_id, has_id)
    return Request(command, arguments, msg_id, has_id)


def safe_encode(reply: Dict[str, Any]) -> bytes:
    """``encode`` that cannot fail: an unencodable reply becomes an error line.

    A reply can only fail to encode through data it echoes (an ``id`` holding a
    float too large for JSON) or a machine method returning odd data.
    """
    try:
        return encode(reply)
    except (TypeError, ValueError) as err:
        fallback = {"error": {"class": "GenericError", "desc": f"reply cannot be encoded: {err}"}}
        return encode(fallback)


def describe(raw: Optional[bytes], limit: int = 200) -> str:
    """A short printable form of a raw message, for logs."""
    if raw is None:
        return "<none>"
    text = raw[:limit].decode("utf-8", "backslashreplace")
    return text + ("..." if len(raw) > limit else "")
