"""SHA-256 from the interpreter's built-in module: ``hashlib`` loads OpenSSL, which
costs milliseconds on a restore that hashes a few kilobytes of state."""

try:
    from _sha256 import sha256          # CPython 3.11
except ImportError:                     # pragma: no cover - other interpreters
    try:
        from _sha2 import sha256        # CPython 3.12+
    except ImportError:
        from hashlib import sha256

__all__ = ["sha256"]
