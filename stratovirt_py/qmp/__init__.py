"""QMP: the JSON management protocol StratoVirt (and QEMU) speak over a socket.

    events.py    EventBus: the machine emits, the server (and tests) subscribe
    address.py   the -qmp option: parse_qmp_address, QmpAddress
    machine.py   MachineControl: what the server needs from the VM (a Protocol)
    protocol.py  framing, request parsing, reply encoding, the greeting
    schema.py    argument schemas of the commands
    commands.py  Dispatcher: runs commands, turns errors into replies in one place
    server.py    QmpServer: sockets, connections, ordering of events and replies
"""

from .commands import COMMANDS, Dispatcher
from .events import EventBus
from .machine import MachineControl
from .protocol import GREETING_LINE, LINE_END
from .address import QmpAddress, parse_qmp_address
from .server import QmpServer

__all__ = [
    "COMMANDS", "Dispatcher", "EventBus", "GREETING_LINE", "LINE_END", "MachineControl",
    "QmpAddress", "QmpServer", "parse_qmp_address",
]
