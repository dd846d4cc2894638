"""The ``-qmp`` option: where the QMP server listens.

StratoVirt accepts ``unix:PATH,server,nowait`` and ``tcp:IP:PORT,server,nowait`` and
nothing else for ``-qmp``; both flags are required (clap marks them so).
"""

from __future__ import annotations

from ..record import record

from ..errors import ConfigError

_USAGE = "expected unix:PATH,server,nowait or tcp:IP:PORT,server,nowait"


@record(frozen=True)
class QmpAddress:
    """A parsed ``-qmp`` value."""

    kind: str          # "unix" | "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_qmp_address(spec: str) -> QmpAddress:
    """Parse ``unix:PATH,server,nowait`` or ``tcp:IP:PORT,server,nowait``.

    Like StratoVirt, both ``server`` and ``nowait`` are required (the VMM never
    connects out, and never waits for a client before starting the guest).
    """
    uri, *options = spec.split(",")
    for option in options:
        if option not in ("server", "nowait"):
            raise ConfigError(f"invalid QMP option '{option}' in '{spec}': {_USAGE}")
    if "server" not in options or "nowait" not in options:
        raise ConfigError(f"QMP socket '{spec}' needs both 'server' and 'nowait': {_USAGE}")
    if uri.startswith("unix:"):
        path = uri[len("unix:"):]
        if not path:
            raise ConfigError(f"QMP socket '{spec}' has an empty path: {_USAGE}")
        return QmpAddress("unix", path=path)
    if uri.startswith("tcp:"):
        host, sep, port_text = uri[len("tcp:"):].rpartition(":")
        if not sep:
            raise ConfigError(f"QMP socket '{spec}' lacks a port: {_USAGE}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            import ipaddress  # only TCP addresses need it
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"invalid IP address '{host}' in QMP socket '{spec}': {_USAGE}") from None
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(f"invalid port '{port_text}' in QMP socket '{spec}': {_USAGE}")
        return QmpAddress("tcp", host=host, port=int(port_text))
    raise ConfigError(f"invalid QMP socket '{spec}': {_USAGE}")
