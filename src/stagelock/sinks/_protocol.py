"""The contract every sink fulfils, and the messages they carry."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, TypedDict, runtime_checkable

__all__ = [
    "ALARM_SCHEMA",
    "ALARM_TOPIC",
    "SHIFT_SCHEMA",
    "SHIFT_TOPIC",
    "STATUS_SCHEMA",
    "STATUS_TOPIC",
    "AlarmMessage",
    "ShiftMessage",
    "ShiftSink",
    "StatusMessage",
    "json_safe",
]

SHIFT_TOPIC = "stagelock.shift"
STATUS_TOPIC = "stagelock.status"
ALARM_TOPIC = "stagelock.alarm"
SHIFT_SCHEMA = "stagelock.shift/1"
STATUS_SCHEMA = "stagelock.status/1"
ALARM_SCHEMA = "stagelock.alarm/1"


class ShiftMessage(TypedDict):
    """One measurement (topic ``stagelock.shift``, schema ``stagelock.shift/1``).

    Shifts are NaN-free: a missing number is ``None`` (JSON ``null``).
    """

    schema: str
    frame: int
    time: float
    dx_px: float | None
    dy_px: float | None
    dx_um: float | None
    dy_um: float | None
    confidence: float
    status: str
    skipped: int
    source: str
    latency_ms: float
    n_regions: int


class StatusMessage(TypedDict):
    """Heartbeat (topic ``stagelock.status``, schema ``stagelock.status/1``)."""

    schema: str
    time: float
    source: str
    state: str
    frames_measured: int
    frames_skipped: int
    fps: float
    dx_px: float | None
    dy_px: float | None
    corrections: int
    alarm: str | None


class AlarmMessage(TypedDict):
    """An alarm raised or cleared (topic ``stagelock.alarm``)."""

    schema: str
    time: float
    alarm: str
    active: bool
    message: str


@runtime_checkable
class ShiftSink(Protocol):
    """Receives every message the daemon produces, on the daemon's worker thread.

    A sink must not block for long: the worker measures the next frame only after
    every sink returned.
    """

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        """Take one message; ``topic`` is dotted (``stagelock.shift``...)."""

    def close(self) -> None:
        """Flush and release resources; idempotent."""


def json_safe(value: Any) -> Any:
    """Replace NaN/inf floats by None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
