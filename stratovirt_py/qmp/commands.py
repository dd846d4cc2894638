"""QMP commands: the table, argument checks, and the one place errors become replies.

``Dispatcher.dispatch`` never raises.  ``VmmError`` from the machine becomes
``{"error": {"class": err.qmp_class, "desc": str(err)}}``; anything else (a bug)
is logged with its traceback and becomes a GenericError, so one bad command cannot
take the QMP thread down.
"""

from __future__ import annotations

import os
from ..logs import get_logger
from ..record import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at run time
    from typing import Any, Callable, Dict, List, Optional, Tuple
    from .machine import MachineControl
    FdSource = Callable[[], Optional[int]]
    Handler = Callable[["Dispatcher", Dict[str, Any], FdSource], Any]

from ..errors import VmmError
from . import schema
from .protocol import CommandNotFound, QmpInputError, Request, error_reply, shown, version_info

log = get_logger(__name__)

#: Returns the oldest file descriptor the client passed with SCM_RIGHTS, or None.


@record
class Outcome:
    """A reply, and what to run once that reply has reached the client."""

    reply: Dict[str, Any]
    # ``quit`` answers first and only then asks the machine to exit (the process may
    # be gone right after), so the call is handed back to the server to run after
    # flushing the reply.
    after_reply: Optional[Callable[[], None]] = None




class Dispatcher:
    """Runs QMP commands against a ``MachineControl``."""

    def __init__(self, machine: MachineControl) -> None:
        self.machine = machine

    # ------------------------------------------------------------------ entry point
    def dispatch(self, request: Request, take_fd: FdSource = lambda: None) -> Outcome:
        entry = COMMANDS.get(request.command)
        try:
            if entry is None:
                raise CommandNotFound(f"The command {shown(request.command)} has not been found")
            handler, arg_schema = entry
            args = schema.validate(request.arguments, arg_schema)
            if request.command == "quit":
                # Nothing to do before the reply; see Outcome.after_reply.
                return Outcome(request.reply({}), after_reply=self.machine.quit)
            value = handler(self, args, take_fd)
            return Outcome(request.reply({} if value is None else value))
        except VmmError as err:
            log.info("QMP command %s failed: %s", shown(request.command), err)
            return Outcome(error_reply(err, err.qmp_class, request.msg_id, request.has_id))
        except Exception as err:  # noqa: BLE001 - a bug must not kill the server
            log.exception("QMP command %s raised an unexpected error", request.command)
            desc = f"internal error in '{request.command}': {type(err).__name__}: {err}"
            return Outcome(error_reply(VmmError(desc), "GenericError",
                                       request.msg_id, request.has_id))

    # ------------------------------------------------------------------ handlers
    def _qmp_capabilities(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        # The server tracks negotiation per connection; StratoVirt answers {} even
        # when repeated, so there is nothing to check here.
        return None

    def _stop(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        # StratoVirt answers {} when already paused (its vCPU pause is a no-op then);
        # the machine's pause() is a no-op in that case too.
        self.machine.pause()

    def _cont(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.resume()

    def _quit(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        raise AssertionError("quit is sequenced by dispatch()")  # pragma: no cover

    def _system_reset(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.system_reset()

    def _system_powerdown(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.system_powerdown()

    def _query_status(self, args: Dict[str, Any], take_fd: FdSource) -> Dict[str, Any]:
        state = self.machine.run_state
        return {"running": state == "running", "singlestep": False, "status": state}

    def _query_cpus(self, args: Dict[str, Any], take_fd: FdSource) -> List[Dict[str, Any]]:
        return [shape_cpu_info(cpu) for cpu in self.machine.cpus()]

    def _query_hotpluggable_cpus(self, args: Dict[str, Any], take_fd: FdSource) -> Any:
        return self.machine.hotpluggable_cpus()

    def _query_version(self, args: Dict[str, Any], take_fd: FdSource) -> Dict[str, Any]:
        return version_info()

    def _query_commands(self, args: Dict[str, Any], take_fd: FdSource) -> List[Dict[str, str]]:
        return [{"name": name} for name in COMMANDS]

    def _getfd(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        fd = take_fd()
        if fd is None:
            # StratoVirt's wording for a getfd without an SCM_RIGHTS fd.
            raise QmpInputError("Invalid SCM message")
        try:
            self.machine.add_fd(args["fdname"], fd)
        except BaseException:
            os.close(fd)  # not taken by the machine: do not leak it
            raise

    def _migrate(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.migrate(args["uri"])

    def _query_migrate(self, args: Dict[str, Any], take_fd: FdSource) -> Dict[str, Any]:
        return self.machine.migrate_info()

    def _migrate_cancel(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.migrate_cancel()

    def _blockdev_add(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.blockdev_add(args)

    def _netdev_add(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.netdev_add(args)

    def _blockdev_del(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.blockdev_del(args["node-name"])

    def _netdev_del(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.netdev_del(args["id"])

    def _device_add(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.device_add(args)

    def _device_del(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.device_del(args["id"])

    def _balloon(self, args: Dict[str, Any], take_fd: FdSource) -> None:
        self.machine.balloon(args["value"])

    def _query_balloon(self, args: Dict[str, Any], take_fd: FdSource) -> Dict[str, Any]:
        return self.machine.query_balloon()


def shape_cpu_info(cpu: Dict[str, Any]) -> Dict[str, Any]:
    """A machine vCPU dict in StratoVirt's query-cpus shape.

    StratoVirt (like QEMU's old query-cpus) names the index ``CPU`` and the host
    thread ``thread_id``; the machine reports ``cpu-index``/``thread-id`` as in
    query-cpus-fast.  Only top-level keys are renamed: ``props`` keeps its
    topology ``thread-id``.
    """
    shaped = dict(cpu)
    if "cpu-index" in shaped:
        shaped["CPU"] = shaped.pop("cpu-index")
    if "thread-id" in shaped:
        shaped["thread_id"] = shaped.pop("thread-id")
    shaped.setdefault("arch", "x86")
    return shaped


# Command name -> (handler, argument schema), in the order query-commands lists them.
COMMANDS: Dict[str, Tuple[Handler, schema.Schema]] = {
    "qmp_capabilities": (Dispatcher._qmp_capabilities, schema.NO_ARGS),
    "quit": (Dispatcher._quit, schema.NO_ARGS),
    "stop": (Dispatcher._stop, schema.NO_ARGS),
    "cont": (Dispatcher._cont, schema.NO_ARGS),
    "system_powerdown": (Dispatcher._system_powerdown, schema.NO_ARGS),
    "system_reset": (Dispatcher._system_reset, schema.NO_ARGS),
    "device_add": (Dispatcher._device_add, schema.DEVICE_ADD),
    "device_del": (Dispatcher._device_del, schema.DEVICE_DEL),
    "netdev_add": (Dispatcher._netdev_add, schema.NETDEV_ADD),
    "netdev_del": (Dispatcher._netdev_del, schema.NETDEV_DEL),
    "query-hotpluggable-cpus": (Dispatcher._query_hotpluggable_cpus, schema.NO_ARGS),
    "query-cpus": (Dispatcher._query_cpus, schema.NO_ARGS),
    "query-status": (Dispatcher._query_status, schema.NO_ARGS),
    "getfd": (Dispatcher._getfd, schema.GETFD),
    "blockdev-add": (Dispatcher._blockdev_add, schema.BLOCKDEV_ADD),
    "blockdev-del": (Dispatcher._blockdev_del, schema.BLOCKDEV_DEL),
    "balloon": (Dispatcher._balloon, schema.BALLOON),
    "query-balloon": (Dispatcher._query_balloon, schema.NO_ARGS),
    "migrate": (Dispatcher._migrate, schema.MIGRATE),
    "query-migrate": (Dispatcher._query_migrate, schema.NO_ARGS),
    "migrate_cancel": (Dispatcher._migrate_cancel, schema.NO_ARGS),
    "query-version": (Dispatcher._query_version, schema.NO_ARGS),
    "query-commands": (Dispatcher._query_commands, schema.NO_ARGS),
}
