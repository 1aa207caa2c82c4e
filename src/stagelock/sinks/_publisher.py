"""Publish measurements on a ZeroMQ PUB socket.

Wire format: two-frame multipart messages ``[topic, json]``, the topic a dotted
ASCII name (``b"stagelock.shift"``, ``b"stagelock.status"``, ``b"stagelock.alarm"``)
so prefix subscriptions work (``b"stagelock."`` = everything), the body UTF-8
JSON with a ``"schema"`` field (``"stagelock.shift/2"``...). NaN is sent as ``null``.

Caveats
-------
*Slow joiner*: a PUB socket sends only to subscribers already connected and
subscribed; messages published before (or within a few milliseconds after) a
subscriber connects are lost for it. Subscribers must not expect the first
messages; the ``stagelock.status`` heartbeat lets them see the daemon is alive.

*Never blocks*: sends use ``zmq.NOBLOCK`` and ``SNDHWM`` bounds each subscriber's
queue; when a subscriber is slow or dead, messages to it are dropped (counted in
:attr:`ZmqPublisher.dropped`), so it cannot slow down measurement.

*Threads*: a ZeroMQ socket is not thread-safe; one thread (the daemon's worker)
owns the publisher and is the only one to call :meth:`ZmqPublisher.publish`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import zmq

from stagelock.protocol import DEFAULT_PUBLISH_ENDPOINT, encode

if TYPE_CHECKING:
    from collections.abc import Mapping

    from stagelock.security import ServerKeys

__all__ = ["ZmqPublisher"]

logger = logging.getLogger(__name__)


CLOSE_LINGER_MS = 200
"""How long :meth:`ZmqPublisher.close` may wait to deliver queued messages."""


class ZmqPublisher:
    """A PUB socket bound to ``endpoint`` that sends JSON messages by topic.

    Parameters
    ----------
    endpoint : str
        Where to bind; loopback by default. ``tcp://*:5556`` exposes it to the
        network (deliberately, not by default).
    hwm : int
        Send high-water mark: messages queued per subscriber before dropping.
    context : zmq.Context, optional
        Default: the process-wide instance.
    curve : ServerKeys, optional
        Make the socket a CURVE server: only subscribers with an authorised key
        (checked by the authenticator the caller started) receive anything.

    Raises
    ------
    zmq.ZMQError
        When the endpoint cannot be bound (address in use, bad endpoint).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_PUBLISH_ENDPOINT,
        *,
        hwm: int = 1000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: ServerKeys | None = None,
    ) -> None:
        ctx = context or zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = ctx.socket(zmq.PUB)
        if curve is not None:
            curve.apply(self._socket)
        self._socket.setsockopt(zmq.SNDHWM, int(hwm))
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError:
            self._socket.close(linger=0)
            self._socket = None
            raise
        # with a wildcard port (tcp://127.0.0.1:*) the real one is known only now
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sent = 0
        """Messages handed to ZeroMQ."""
        self.dropped = 0
        """Messages ZeroMQ refused (queue full); they are lost."""

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        """Send one message without blocking; drop it if the queue is full.

        Parameters
        ----------
        topic : str
            Dotted ASCII topic, e.g. ``"stagelock.shift"``.
        message : mapping
            JSON-serialisable values; NaN/inf become null.
        """
        if self._socket is None:
            return
        try:
            self._socket.send_multipart(encode(topic, message), flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        """Close the socket, flushing what was sent for at most 0.2 s; idempotent.

        The last messages before a stop (the alarm that stopped it, the final
        status) are often still queued; closed with no linger, ZeroMQ drops
        them. The bound keeps a stop from waiting on a stalled subscriber.
        """
        if self._socket is not None:
            self._socket.close(linger=CLOSE_LINGER_MS)
            self._socket = None
