"""The bundled test/demo guest (freestanding C/asm in ``src/``), built with gcc on
first use. See ``PROTOCOL.md`` for its command line and serial output."""

from stratovirt_py.guest.build import GuestBuildError, build_guest

__all__ = ["GuestBuildError", "build_guest"]
