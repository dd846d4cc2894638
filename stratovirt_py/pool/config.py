"""The pool's settings: defaults, overridden by an optional YAML file, then by flags."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from ..errors import ConfigError

DEFAULT_SOCKET = "/run/stratovirt/pool.sock"
DEFAULT_CONFIG = "/etc/stratovirt/pool.yaml"


class PoolConfig:
    """``socket``: where ``stratovirt`` finds the pool (the front end's default too).
    ``spares``: VM processes kept forked ahead of requests.
    ``max_children``: VM processes alive at once; past it a request is turned away
    (the launcher then runs the VM itself).
    ``request_timeout``: seconds a connection may take to send its request.
    ``socket_mode``: permissions of the socket (who may start VMs here).
    """

    FIELDS = {"socket": str, "spares": int, "max_children": int, "request_timeout": float,
              "socket_mode": int}

    def __init__(self) -> None:
        self.socket = DEFAULT_SOCKET
        self.spares = 4
        self.max_children = 1024
        self.request_timeout = 5.0
        self.socket_mode = 0o600

    def update(self, values: Dict[str, Any], where: str) -> None:
        for key, value in values.items():
            kind = self.FIELDS.get(key)
            if kind is None:
                raise ConfigError(f"{where}: unknown setting '{key}' "
                                  f"(known: {', '.join(sorted(self.FIELDS))})")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"{where}: '{key}' must be {kind.__name__}, not {value!r}")
            if kind in (int, float) and value < (0 if key == "socket_mode" else 1):
                raise ConfigError(f"{where}: '{key}' must be positive")
            setattr(self, key, value)


def load(path: Optional[str]) -> PoolConfig:
    """The settings from ``path`` (or the default file, when it exists)."""
    cfg = PoolConfig()
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    if not explicit and not os.path.exists(path):
        return cfg
    import yaml
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if values is None:
        return cfg
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    cfg.update(values, path)
    return cfg
