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
