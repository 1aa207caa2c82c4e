"""The control socket: a ZeroMQ REP server in the daemon and the ``ctl`` client.

Requests and replies are JSON objects. A request names a command::

    {"command": "status"}

and every reply uses one envelope::

    {"ok": true, ...}                                   # success, command fields
    {"ok": false, "error": "unknown command 'pasue'", "code": "unknown_command"}

Error codes: ``invalid_json``, ``invalid_request``, ``unknown_command``,
``internal_error``. A REP socket must answer every request before it can receive
the next one, so every failure (bad JSON, unknown command, a handler raising)
becomes an error reply and a log line, never an exception that skips the reply.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import zmq

from stagelock.protocol import json_safe

if TYPE_CHECKING:
    from stagelock.security import ClientKeys, ServerKeys

__all__ = [
    "CommandError",
    "ControlServer",
    "NoAnswer",
    "error_reply",
    "ok_reply",
    "request",
]

logger = logging.getLogger(__name__)

Handler = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]
"""A command handler: the request in, the reply's extra fields out."""


class CommandError(Exception):
    """Raised by a handler to reply ``{"ok": false, "error": msg, "code": code}``."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


class NoAnswer(Exception):
    """No daemon answered the request in time."""


def ok_reply(**fields: Any) -> dict[str, Any]:
    """Build the success envelope ``{"ok": true, **fields}``."""
    return {"ok": True, **fields}


def error_reply(error: str, code: str) -> dict[str, Any]:
    """Build the failure envelope ``{"ok": false, "error": ..., "code": ...}``."""
    return {"ok": False, "error": error, "code": code}


class ControlServer:
    """Answer JSON commands on a REP socket from a thread of its own.

    Parameters
    ----------
    endpoint : str
        Where to bind; loopback by default (anyone who can connect can stop the
        daemon).
    handlers : mapping of str to callable
        The dispatch table: command name → handler. A handler receives the whole
        request and returns the reply's extra fields (or None); it runs on the
        server thread and must be quick and thread-safe.
    context : zmq.Context, optional
        Default: the process-wide instance.
    curve : ServerKeys, optional
        Make the socket a CURVE server: only clients with an authorised key
        (checked by the authenticator the caller started) get their requests in.

    Notes
    -----
    States: bound (constructed) → serving (:meth:`start`) → closed (:meth:`close`).
    The socket is created on the caller's thread but used only by the server thread
    once started, and closed by it when it ends.
    """

    poll_interval_s = 0.1
    """How often the server thread checks whether it should end."""

    def __init__(
        self,
        endpoint: str,
        handlers: Mapping[str, Handler],
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: ServerKeys | None = None,
    ) -> None:
        ctx = context or zmq.Context.instance()
        self.handlers = dict(handlers)
        self._socket: zmq.Socket[bytes] = ctx.socket(zmq.REP)
        if curve is not None:
            curve.apply(self._socket)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError:
            self._socket.close(linger=0)
            raise
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.requests = 0
        """Requests answered so far."""

    def start(self) -> None:
        """Serve requests on a daemon thread until :meth:`close`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._serve, name="stagelock-control", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        sock = self._socket
        try:
            while not self._stop.is_set():
                if not sock.poll(int(self.poll_interval_s * 1000), zmq.POLLIN):
                    continue
                # the whole message: a REP socket answers only after every part
                # was read, and a multipart request is an error, not a wedge
                parts = sock.recv_multipart()
                if len(parts) == 1:
                    reply = self.dispatch(parts[0])
                else:
                    logger.warning("control: request of %d frames", len(parts))
                    reply = error_reply(
                        f"a request is one JSON frame; got {len(parts)} frames",
                        "invalid_request",
                    )
                sock.send(self._encode(reply))
                self.requests += 1
        except zmq.ZMQError as exc:
            if not self._stop.is_set():
                logger.error("control socket failed: %s", exc)
        finally:
            # a short linger lets the reply to "stop" leave before the socket goes
            sock.close(linger=200)

    @staticmethod
    def _encode(reply: Mapping[str, Any]) -> bytes:
        try:
            return json.dumps(json_safe(reply), allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            logger.exception("control reply not serialisable")
            return json.dumps(
                error_reply(f"reply not serialisable: {exc}", "internal_error")
            ).encode()

    @property
    def alive(self) -> bool:
        """Whether the server thread is serving (False once it died or closed)."""
        return self._thread is not None and self._thread.is_alive()

    def dispatch(self, raw: bytes) -> dict[str, Any]:
        """Turn one raw request into its reply; never raises.

        Parameters
        ----------
        raw : bytes
            The request as received.

        Returns
        -------
        dict
            The reply envelope.
        """
        try:
            req = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            # JSONDecodeError, bad UTF-8, an integer of thousands of digits,
            # nesting deeper than the recursion limit
            text = str(exc)[:200]
            logger.warning("control: invalid JSON request %r: %s", raw[:80], text)
            return error_reply(f"invalid JSON: {text}", "invalid_json")
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            logger.warning("control: request without a command: %r", raw[:80])
            return error_reply(
                'a request is a JSON object with a "command" string', "invalid_request"
            )
        command = req["command"]
        handler = self.handlers.get(command)
        if handler is None:
            logger.warning("control: unknown command %r", command)
            known = ", ".join(sorted(self.handlers))
            return error_reply(
                f"unknown command '{command}' (known: {known})", "unknown_command"
            )
        try:
            extra = handler(req)
        except CommandError as exc:
            logger.warning("control: %s failed: %s", command, exc)
            return error_reply(str(exc), exc.code)
        except Exception as exc:
            logger.exception("control: %s raised", command)
            return error_reply(f"{command} failed: {exc}", "internal_error")
        logger.debug("control: %s answered", command)
        return ok_reply(**dict(extra or {}))

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop serving and close the socket; idempotent."""
        self._stop.set()
        if self._thread is None:
            if not self._socket.closed:
                self._socket.close(linger=0)
            return
        self._thread.join(timeout_s)


def request(
    endpoint: str,
    command: str,
    *,
    timeout_s: float = 2.0,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    keys: ClientKeys | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Send one command to a daemon and return its reply.

    Parameters
    ----------
    endpoint : str
        The daemon's control endpoint, e.g. ``tcp://127.0.0.1:5557``.
    command : str
        ``status``, ``pause``, ``resume``, ``rereference``, ``stop``...
    timeout_s : float
        How long to wait for the reply.
    context : zmq.Context, optional
        Default: the process-wide instance.
    keys : ClientKeys, optional
        Talk CURVE to a daemon started with ``--keys``.
    **params
        Extra request fields.

    Returns
    -------
    dict
        The reply envelope (``ok`` true or false).

    Raises
    ------
    NoAnswer
        When no reply came within ``timeout_s`` (no daemon, or it is wedged).
    """
    ctx = context or zmq.Context.instance()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.REQ)
    # linger 0: an unanswered request must not keep the process alive at exit
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    try:
        sock.connect(endpoint)
        sock.send(json.dumps({"command": command, **params}).encode())
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise NoAnswer(
                f"no stagelock daemon answered at {endpoint} within {timeout_s:g} s"
                + (
                    " (with --keys: is this client's key authorised?)"
                    if keys is not None
                    else ""
                )
            )
        reply = json.loads(sock.recv().decode("utf-8"))
    finally:
        sock.close(linger=0)
    if not isinstance(reply, dict):
        raise NoAnswer(f"the daemon at {endpoint} sent a malformed reply: {reply!r}")
    return reply
