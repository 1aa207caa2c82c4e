"""The live daemon: wires a source, the registration, the sinks and the stage loop.

:func:`build_daemon` turns a :class:`~stagelock.config.Config` into a
:class:`Daemon`; :meth:`Daemon.run` measures until stopped. The control socket
(:class:`ControlServer`, :func:`request`) answers the commands of
:data:`COMMANDS`.
"""

from ._build import (
    build_daemon,
    build_mda_lock,
    build_sinks,
    build_source,
    build_stage_loop,
)
from ._commands import COMMANDS
from ._daemon import Daemon, DaemonError
from ._rpc import CommandError, ControlServer, NoAnswer, request
from ._sdnotify import SystemdNotifier
from ._slot import KeyedLatestSlot, LatestSlot, SlotClosed
from ._status import DaemonStatus

__all__ = [
    "COMMANDS",
    "CommandError",
    "ControlServer",
    "Daemon",
    "DaemonError",
    "DaemonStatus",
    "KeyedLatestSlot",
    "LatestSlot",
    "NoAnswer",
    "SlotClosed",
    "SystemdNotifier",
    "build_daemon",
    "build_mda_lock",
    "build_sinks",
    "build_source",
    "build_stage_loop",
    "request",
]
