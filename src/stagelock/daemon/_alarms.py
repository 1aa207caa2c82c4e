"""The daemon's standing alarms: raised and cleared once, each one published.

An alarm is a name (``source_lost``, ``measurement_failing``, ``stage_...``)
with a message. Raising a standing alarm again or clearing a clear one does
nothing, so a condition that lasts is logged and published once, and its end
once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from stagelock.protocol import ALARM_SCHEMA, ALARM_TOPIC, AlarmMessage

__all__ = ["Alarms"]

logger = logging.getLogger("stagelock.daemon")

Send = Callable[[str, Mapping[str, Any]], None]


class Alarms:
    """The set of standing alarms, thread-safe.

    Parameters
    ----------
    source : str
        Put in every alarm message's ``source``.
    send : callable
        ``send(topic, message)``: hands a message to the sinks.
    """

    def __init__(self, source: str, send: Send) -> None:
        self._source = source
        self._send = send
        self._lock = threading.Lock()
        self._standing: dict[str, str] = {}

    def set(self, name: str, message: str | None) -> None:
        """Raise ``name`` with ``message``, or clear it when ``message`` is None."""
        with self._lock:
            was = name in self._standing
            if message is None:
                self._standing.pop(name, None)
            else:
                self._standing[name] = message
        if message is not None and not was:
            logger.warning("alarm %s: %s", name, message)
        elif message is None and was:
            logger.info("alarm %s cleared", name)
        else:
            return
        self._send(
            ALARM_TOPIC,
            AlarmMessage(
                schema=ALARM_SCHEMA,
                source=self._source,
                time=time.time(),
                alarm=name,
                active=message is not None,
                message=message or f"{name} cleared",
            ),
        )

    def clear_prefix(self, prefix: str, *, keep: str | None = None) -> None:
        """Clear every standing alarm whose name starts with ``prefix``."""
        with self._lock:
            names = [a for a in self._standing if a.startswith(prefix) and a != keep]
        for name in names:
            self.set(name, None)

    def summary(self) -> str | None:
        """Return the standing alarms' names, sorted and comma-separated, or None."""
        with self._lock:
            return ", ".join(sorted(self._standing)) or None
