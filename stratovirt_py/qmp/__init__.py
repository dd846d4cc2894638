"""QMP: the JSON management protocol StratoVirt (and QEMU) speak over a socket.

    events.py    EventBus: the machine emits, the server (and tests) subscribe
    address.py   the -qmp option: parse_qmp_address, QmpAddress
    machine.py   MachineControl: what the server needs from the VM (a Protocol)
    protocol.py  framing, request parsing, reply encoding, the greeting
    schema.py    argument schemas of the commands
    commands.py  Dispatcher: runs commands, turns errors into replies in one place
    server.py    QmpServer: sockets, connections, ordering of events and replies
"""

from __future__ import annotations

# Names are loaded on first use: the restore path imports only what it needs.
_EXPORTS = {
    "COMMANDS": "commands", "Dispatcher": "commands", "EventBus": "events",
    "MachineControl": "machine", "GREETING_LINE": "protocol", "LINE_END": "protocol",
    "QmpAddress": "address", "parse_qmp_address": "address", "QmpServer": "server",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
