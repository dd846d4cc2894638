"""Section payload encoding: plain data <-> bytes, lossless for bytes and tuples.

A section's data is plain data: ``None``, ``bool``, ``int``, ``float``, ``str``,
``bytes`` (``bytearray``/``memoryview`` are written as bytes), ``list``, ``tuple``
and ``dict`` with ``str`` keys; records (``stratovirt_py.record``) and dataclass
instances are converted to dicts first.  Anything else is refused when writing.

The payload is one UTF-8 JSON object (encoding name ``"tagged-json-1"``)::

    {"v": <the value, with every bytes object replaced by its base64 string>,
     "b": [<path of each bytes value>, ...],
     "t": [<path of each tuple, children before parents>, ...]}

A path is a list of dict keys (str) and list indexes (int) from the top value
(``[]`` is the top value itself).  ``"b"`` and ``"t"`` are left out when empty.
Decoding is ``json.loads`` (C speed) plus one walk per listed path, so its cost
does not grow with the number of plain values.  Nothing is ever unpickled.
"""

from __future__ import annotations

import binascii
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, List, Union
    Path = List[Union[str, int]]

from .. import jsonread
from ..errors import SnapshotError
from ..record import asdict, is_record

ENCODING = "tagged-json-1"



def _prepare(value: Any, path: Path, bpaths: List[Path], tpaths: List[Path], where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        bpaths.append(list(path))
        return binascii.b2a_base64(bytes(value), newline=False).decode("ascii")
    if isinstance(value, (list, tuple)):
        out = []
        for i, item in enumerate(value):
            path.append(i)
            out.append(_prepare(item, path, bpaths, tpaths, where))
            path.pop()
        if isinstance(value, tuple):
            tpaths.append(list(path))
        return out
    if isinstance(value, dict):
        out_d = {}
        for k, item in value.items():
            if not isinstance(k, str):
                raise SnapshotError(f"{where}: dict key {k!r} at {_fmt(path)} is not a string")
            path.append(k)
            out_d[k] = _prepare(item, path, bpaths, tpaths, where)
            path.pop()
        return out_d
    if is_record(value):
        return _prepare(asdict(value), path, bpaths, tpaths, where)
    # dataclasses is never imported for this: a dataclass instance means it already was
    dc = sys.modules.get("dataclasses")
    if dc is not None and dc.is_dataclass(value) and not isinstance(value, type):
        return _prepare(dc.asdict(value), path, bpaths, tpaths, where)
    raise SnapshotError(f"{where}: cannot store a value of type {type(value).__name__} "
                        f"at {_fmt(path)}")


def _fmt(path: Path) -> str:
    return "".join(f"[{p!r}]" for p in path) or "the top level"


def encode(value: Any, where: str = "section") -> bytes:
    """Encode plain data; ``where`` names the section in error messages."""
    bpaths: List[Path] = []
    tpaths: List[Path] = []
    doc = {"v": _prepare(value, [], bpaths, tpaths, where)}
    if bpaths:
        doc["b"] = bpaths
    if tpaths:
        doc["t"] = tpaths
    import json
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode("utf-8")


def _replace(root: dict, path: Path, fn) -> None:
    parent: Any = root
    key: Union[str, int] = "v"
    for p in path:
        parent = parent[key]
        key = p
    if isinstance(parent, dict) and not isinstance(key, str):
        raise TypeError("bad path")
    parent[key] = fn(parent[key])


def _to_tuple(x: Any) -> tuple:
    if not isinstance(x, list):
        raise TypeError("tuple path does not name a list")
    return tuple(x)


def _to_bytes(x: Any) -> bytes:
    if not isinstance(x, str):
        raise TypeError("bytes path does not name a string")
    return binascii.a2b_base64(x, strict_mode=True)


def decode(payload: bytes, where: str = "section") -> Any:
    """Decode a payload written by ``encode``; ``SnapshotError`` when it is malformed."""
    try:
        doc = jsonread.loads(payload)
        if not isinstance(doc, dict) or "v" not in doc:
            raise ValueError("not a tagged-json object")
        for path in doc.get("b", ()):
            _replace(doc, path, _to_bytes)
        # children are listed before their parents, so lists become tuples bottom-up
        for path in doc.get("t", ()):
            _replace(doc, path, _to_tuple)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise SnapshotError(f"{where} is malformed: {e}") from None
    return doc["v"]

