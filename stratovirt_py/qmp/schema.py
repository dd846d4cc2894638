"""Argument schemas of the QMP commands, and their validation.

StratoVirt declares every command's arguments as a serde struct with
``deny_unknown_fields``; the tables below are those structs for the commands a
microvm has (machine_manager/src/qmp/qmp_schema.rs), with the same member names and
JSON types.  So a client that StratoVirt accepts is accepted here, and a typo in an
argument name is an error naming that argument instead of being silently ignored.
Kata's shapes (blockdev-add with ``file.aio``, device_add with a string ``addr``)
are covered by tests.
"""

from __future__ import annotations

from ..record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Dict, Mapping, Union
    Schema = Mapping[str, "Arg"]

from .protocol import QmpInputError, shown


@record(frozen=True)
class Arg:
    """One argument: its JSON type (or a nested schema) and whether it is required."""

    kind: Union[str, "Schema"]
    required: bool = False



_TYPE_NAMES = {"str": "string", "int": "integer", "uint": "unsigned integer",
               "bool": "boolean", "list": "array", "object": "object"}


def _req(kind: Union[str, Schema]) -> Arg:
    return Arg(kind, required=True)


def _opt(kind: Union[str, Schema]) -> Arg:
    return Arg(kind)


NO_ARGS: Schema = {}

# blockdev-add's "file" member (FileOptions) and "cache" member (CacheOptions).
_FILE_OPTIONS: Schema = {"driver": _req("str"), "filename": _req("str"), "aio": _opt("str")}
_CACHE_OPTIONS: Schema = {"no-flush": _opt("bool"), "direct": _opt("bool")}

BLOCKDEV_ADD: Schema = {
    "node-name": _req("str"),
    "file": _req(_FILE_OPTIONS),
    "media": _opt("str"),
    "cache": _opt(_CACHE_OPTIONS),
    "read-only": _opt("bool"),
    "detect-zeroes": _opt("str"),
    "driver": _opt("str"),
    "backing": _opt("str"),
    "discard": _opt("str"),
    "id": _opt("str"),
    "options": _opt("str"),
    "throttling.iops-total": _opt("uint"),
    "l2-cache-size": _opt("str"),
    "refcount-cache-size": _opt("str"),
}

NETDEV_ADD: Schema = {
    "id": _req("str"),
    "ifname": _opt("str"),
    "fd": _opt("str"),
    "fds": _opt("str"),
    "dnssearch": _opt("str"),
    "type": _opt("str"),
    "vhost": _opt("bool"),
    "vhostfd": _opt("str"),
    "vhostfds": _opt("str"),
    "downscript": _opt("str"),
    "script": _opt("str"),
    "queues": _opt("uint"),
    "chardev": _opt("str"),
    "macnat": _opt("bool"),
}

DEVICE_ADD: Schema = {
    "id": _req("str"),
    "driver": _req("str"),
    "addr": _opt("str"),
    "lun": _opt("uint"),
    "drive": _opt("str"),
    "romfile": _opt("str"),
    "share-rw": _opt("str"),
    "bus": _opt("str"),
    "mac": _opt("str"),
    "netdev": _opt("str"),
    "chardev": _opt("str"),
    "disable-modern": _opt("str"),
    "mq": _opt("str"),
    "vectors": _opt("str"),
    "serial": _opt("str"),
    "iothread": _opt("str"),
    "multifunction": _opt("bool"),
    "host": _opt("str"),
    "num-queues": _opt("uint"),
    "boot_index": _opt("uint"),
    "sysfsdev": _opt("str"),
    "queue-size": _opt("uint"),
    "port": _opt("str"),
    "backend": _opt("str"),
    "path": _opt("str"),
}

DEVICE_DEL: Schema = {"id": _req("str")}
BLOCKDEV_DEL: Schema = {"node-name": _req("str")}
NETDEV_DEL: Schema = {"id": _req("str")}
GETFD: Schema = {"fdname": _req("str")}
BALLOON: Schema = {"value": _req("uint")}
# StratoVirt's migrate struct is the only one without deny_unknown_fields; libvirt-
# style clients add these QEMU flags, which a snapshot to a file has no use for.
MIGRATE: Schema = {"uri": _req("str"), "detach": _opt("bool"), "blk": _opt("bool"),
                   "inc": _opt("bool"), "resume": _opt("bool")}


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "uint"):
        # bool is an int subclass in Python but not a JSON integer.
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return kind == "int" or value >= 0
    if kind == "list":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    raise AssertionError(f"unknown schema type {kind!r}")


def validate(arguments: Mapping[str, Any], schema: Schema, prefix: str = "") -> Dict[str, Any]:
    """Check ``arguments`` against ``schema``; return a plain copy.

    Raises QmpInputError whose message names the offending argument, with a dotted
    path for nested members (``file.filename``); the wording follows QEMU's.
    """
    for name in arguments:
        if name not in schema:
            raise QmpInputError(f"Parameter '{prefix}{shown(name)}' is unexpected")
    checked: Dict[str, Any] = {}
    for name, arg in schema.items():
        path = prefix + name
        if name not in arguments:
            if arg.required:
                raise QmpInputError(f"Parameter '{path}' is missing")
            continue
        value = arguments[name]
        if isinstance(arg.kind, str):
            if not _type_ok(arg.kind, value):
                raise QmpInputError(
                    f"Invalid parameter type for '{path}', expected: {_TYPE_NAMES[arg.kind]}")
            checked[name] = value
        else:
            if not isinstance(value, dict):
                raise QmpInputError(f"Invalid parameter type for '{path}', expected: object")
            checked[name] = validate(value, arg.kind, path + ".")
    return checked
