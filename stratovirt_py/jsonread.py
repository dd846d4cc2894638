"""JSON decoding without importing ``json``.

``json`` imports ``re`` (and with it ``enum``) and compiles its patterns at import:
milliseconds on a restore's critical path, where only decoding is needed.  The
C scanner behind ``json.loads`` is used here directly, configured as
``json.loads`` configures it by default.
"""

from __future__ import annotations

import _json


class _Options:
    # the attributes _json.make_scanner reads
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float      # NaN, Infinity, -Infinity, as json.loads reads them
    memo = None


_scan = _json.make_scanner(_Options)


def loads(data) -> object:
    """Decode one JSON value (str, bytes or bytearray, UTF-8); ValueError if it is not exactly that."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
    text = text.strip(" \t\n\r")
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not a JSON value") from None
    if end != len(text):
        raise ValueError(f"extra data at position {end}")
    return value
