"""The control commands, one handler each (as circus keeps ``commands/``).

A handler takes the daemon and the request and returns the reply's fields; the
RPC server (:mod:`._rpc`) wraps them in ``{"ok": true, ...}`` and turns a
:class:`~stagelock.daemon.CommandError` into ``{"ok": false, ...}``. Adding a
command is adding a function here and a line in :data:`COMMANDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from stagelock.protocol import DaemonState

from ._rpc import CommandError

if TYPE_CHECKING:
    from ._daemon import Daemon

__all__ = ["COMMANDS", "Command"]

Command = Callable[["Daemon", Mapping[str, Any]], Mapping[str, Any]]
"""A command: the daemon and the request in, the reply's fields out."""


def status(daemon: Daemon, request: Mapping[str, Any]) -> Mapping[str, Any]:
    """``{"command": "status"}`` → ``{"ok": true, "state": ..., ...}``.

    ``stagelock ctl status``
    """
    return daemon.status().as_dict()


def pause(daemon: Daemon, request: Mapping[str, Any]) -> Mapping[str, Any]:
    """``{"command": "pause"}`` → ``{"ok": true, "state": "paused"}``.

    ``stagelock ctl pause``: frames keep arriving and are dropped unmeasured;
    the stage loop makes no correction until ``resume``.
    """
    daemon.pause()
    return {"state": DaemonState.PAUSED.value}


def resume(daemon: Daemon, request: Mapping[str, Any]) -> Mapping[str, Any]:
    """``{"command": "resume"}`` → ``{"ok": true, "state": "measuring"}``.

    ``stagelock ctl resume``
    """
    daemon.resume()
    return {"state": daemon.status().state}


def rereference(daemon: Daemon, request: Mapping[str, Any]) -> Mapping[str, Any]:
    """``{"command": "rereference"}`` → ``{"ok": true, "rereference": ...}``.

    ``stagelock ctl rereference``: the next good frame becomes the reference
    (and replaces the saved one in the state directory). The stage loop's drift
    history starts afresh there; its travel limit stays centred on the
    original origin (``reset-origin`` moves it).
    """
    daemon.rereference()
    return {"rereference": "requested"}


def reset_origin(daemon: Daemon, request: Mapping[str, Any]) -> Mapping[str, Any]:
    """``{"command": "reset-origin"}`` → ``{"ok": true, "origin": "next_frame"}``.

    ``stagelock ctl reset-origin``: centre the stage's travel limit on the stage
    position at the next frame (saved in the state directory). Without a stage
    loop: ``{"ok": false, "code": "no_stage"}``.
    """
    try:
        daemon.reset_origin()
    except ValueError as exc:
        raise CommandError(str(exc), "no_stage") from None
    return {"origin": "next_frame"}


def stop(daemon: Daemon, request: Mapping[str, Any]) -> Mapping[str, Any]:
    """``{"command": "stop"}`` → ``{"ok": true, "state": "stopping"}``.

    ``stagelock ctl stop``: the same shutdown as SIGTERM.
    """
    if daemon.stop_requested:
        raise CommandError("already stopping", "stopping")
    daemon.request_stop("stop command")
    return {"state": DaemonState.STOPPING.value}


COMMANDS: dict[str, Command] = {
    "status": status,
    "pause": pause,
    "resume": resume,
    "rereference": rereference,
    "reset-origin": reset_origin,
    "stop": stop,
}
"""Command name → handler: the control socket's dispatch table."""
