"""The root of the project's error tree.

Every error that can reach a user derives from ``VmmError`` and carries a message
written for that user.  The edges translate them in one place each: the CLI prints
``str(err)`` on stderr and exits 1; the QMP server answers
``{"error": {"class": err.qmp_class, "desc": str(err)}}``.

    VmmError
     +-- ConfigError        bad command line / configuration
     +-- GuestMemoryError   an access outside guest RAM
     +-- BootError          kernel / initrd cannot be loaded
     +-- DeviceError        a device backend failed (drive file, tap, ...)
     +-- SnapshotError      snapshot cannot be written / template cannot be restored
     +-- KvmError           (stratovirt_py.kvm.errors) an ioctl on /dev/kvm failed
"""

from __future__ import annotations


class VmmError(Exception):
    """An error with a message meant for the user."""

    qmp_class = "GenericError"


class ConfigError(VmmError):
    """The command line or a QMP argument describes an impossible machine."""


class GuestMemoryError(VmmError):
    """A guest physical address range that is not (entirely) backed by RAM."""


class BootError(VmmError):
    """The kernel or initrd cannot be loaded."""


class DeviceError(VmmError):
    """A device backend cannot be set up or used."""


class SnapshotError(VmmError):
    """A snapshot cannot be written, or a template cannot be restored."""


# -- template fields ---------------------------------------------------------------------------
# A checksum proves a template intact, not sane: anyone who can write one can recompute it.
# Every value read from a template is checked against a spec before anything is built
# from it.  Plain isinstance/range checks: they run on every restore.
#
# A spec maps a field name to ("int", lo, hi) | ("bool",) | ("bytes", max_len) |
# ("str", max_len) | ("list", max_len) | ("dict",); "?int" and "?str" also allow None.

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


def field_error(section: str, field: str, problem: str) -> SnapshotError:
    return SnapshotError(f"template section '{section}': field '{field}' {problem}")


def check_value(section: str, field: str, value: object, spec: tuple) -> None:
    """One value against one spec entry (see above)."""
    kind = spec[0]
    if kind[0] == "?":
        if value is None:
            return
        kind = kind[1:]
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise field_error(section, field, f"is {type(value).__name__}, not an integer")
        if not spec[1] <= value <= spec[2]:
            raise field_error(section, field, f"is {value}, out of range {spec[1]}..{spec[2]}")
        return
    want = {"bool": bool, "bytes": bytes, "str": str, "list": list, "dict": dict}[kind]
    if not isinstance(value, want):
        raise field_error(section, field, f"is {type(value).__name__}, not {kind}")
    if len(spec) > 1 and len(value) > spec[1]:
        raise field_error(section, field, f"is {len(value)} long, more than {spec[1]}")


def check_fields(section: str, data: object, spec: dict, prefix: str = "") -> None:
    """``data`` must be a dict with exactly the fields of ``spec``, each within it."""
    if not isinstance(data, dict):
        raise field_error(section, prefix.rstrip(".") or "(all)",
                          f"is {type(data).__name__}, not a mapping")
    if data.keys() != spec.keys():
        for name in data:
            if name not in spec:
                raise field_error(section, f"{prefix}{name}", "is not a field of this section")
        missing = next(name for name in spec if name not in data)
        raise field_error(section, f"{prefix}{missing}", "is missing")
    for name, entry in spec.items():
        value = data[name]
        # The common cases inline (a restore checks a few hundred values), the rest and
        # every error through check_value.
        kind = entry[0]
        if kind == "int":
            if type(value) is int and entry[1] <= value <= entry[2]:
                continue
        elif kind == "bytes":
            if type(value) is bytes and len(value) <= entry[1]:
                continue
        elif kind == "bool" and type(value) is bool:
            continue
        check_value(section, prefix + name, value, entry)
