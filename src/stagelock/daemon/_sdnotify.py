"""The systemd notification protocol (``sd_notify``), without libsystemd.

systemd passes ``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name starting
with ``@``) to ``Type=notify`` services; each notification is one datagram of
``KEY=VALUE`` lines. ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) are set when the
unit has ``WatchdogSec=``; the service must then send ``WATCHDOG=1`` more often
than that, conventionally every half period. Outside systemd every call is a
no-op. Nothing is sent after ``STOPPING=1``: systemd takes it as the last word
(a ``STATUS=`` after it would show a running state for a stopping service).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

logger = logging.getLogger(__name__)


class SystemdNotifier:
    """Send notifications to systemd over ``$NOTIFY_SOCKET``.

    Parameters
    ----------
    environ : mapping, optional
        Where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``;
        default ``os.environ``.

    Attributes
    ----------
    enabled : bool
        Whether a notify socket was given.
    watchdog_interval_s : float or None
        How often to send ``WATCHDOG=1`` (half of ``WATCHDOG_USEC``), or None when
        the watchdog is off (or meant for another process).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            # abstract namespace: a leading NUL byte instead of '@'
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        self.enabled = self._address is not None
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 2e6
        self._sock: socket.socket | None = None
        self._stopping = False
        # the worker (heartbeats, watchdog) and the main thread (ready, stopping,
        # close) both notify: one lock, so close() never races a send into
        # opening a socket nobody closes
        self._lock = threading.Lock()
        self.sent: list[str] = []
        """Notifications sent successfully (the last 100), for status and tests."""

    def notify(self, **fields: str | int) -> bool:
        """Send one notification of ``KEY=VALUE`` lines.

        Parameters
        ----------
        **fields
            E.g. ``READY=1``, ``STATUS="measuring"``.

        Returns
        -------
        bool
            True when sent; False outside systemd, after :meth:`stopping`, or
            when the send failed (logged; a notification is never worth
            crashing for).
        """
        with self._lock:
            return self._notify(fields)

    def _notify(self, fields: Mapping[str, str | int]) -> bool:
        if self._address is None or self._stopping:
            return False
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                # the measurement worker sends these: a full queue on the other
                # side (nobody reading) must drop a notification, never stall it
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), self._address)
        except BlockingIOError:
            logger.debug(
                "sd_notify %r dropped: the notify socket's queue is full", text
            )
            return False
        except OSError as exc:
            logger.warning("sd_notify %r failed: %s", text, exc)
            return False
        self.sent = [*self.sent[-99:], text]
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up finished (optionally with a ``STATUS=``)."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: still healthy."""
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        """``STATUS=...``: one line shown by ``systemctl status``."""
        return self.notify(STATUS=text.replace("\n", " "))

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown began; every later notification is dropped."""
        with self._lock:
            sent = self._notify({"STOPPING": 1})
            self._stopping = True
        return sent

    def close(self) -> None:
        """Close the socket; idempotent."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
