"""The wire protocol: every topic, schema and message of stagelock, defined once.

The daemon publishes multipart ZeroMQ messages ``[topic, UTF-8 JSON]`` on a PUB
socket and answers JSON requests on a REP socket. Everything that crosses those
sockets, or that a record file holds, is declared here; the daemon, the sinks,
the monitor and the plot all import it from here.

Messages are JSON, never pickle. Numbers are NaN-free: a missing number is
``None`` (JSON ``null``), see :func:`json_safe`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypedDict

__all__ = [
    "ALARM_SCHEMA",
    "ALARM_TOPIC",
    "CORRECTION_SCHEMA",
    "CORRECTION_TOPIC",
    "DEFAULT_CONTROL_ENDPOINT",
    "DEFAULT_PUBLISH_ENDPOINT",
    "SHIFT_SCHEMA",
    "SHIFT_TOPIC",
    "STATUS_SCHEMA",
    "STATUS_TOPIC",
    "TOPIC_PREFIX",
    "AlarmMessage",
    "CorrectionMessage",
    "DaemonState",
    "ShiftMessage",
    "StatusMessage",
    "encode",
    "encode_body",
    "finite_or_none",
    "json_safe",
]

DEFAULT_PUBLISH_ENDPOINT = "tcp://127.0.0.1:5556"
"""Where ``stagelock run`` publishes and ``stagelock monitor`` listens."""
DEFAULT_CONTROL_ENDPOINT = "tcp://127.0.0.1:5557"
"""Where ``stagelock run`` answers and ``stagelock ctl`` asks."""

TOPIC_PREFIX = "stagelock."
"""Every topic starts with this (subscribe to it for everything)."""

SHIFT_TOPIC = "stagelock.shift"
STATUS_TOPIC = "stagelock.status"
ALARM_TOPIC = "stagelock.alarm"
CORRECTION_TOPIC = "stagelock.correction"
SHIFT_SCHEMA = "stagelock.shift/2"
STATUS_SCHEMA = "stagelock.status/1"
ALARM_SCHEMA = "stagelock.alarm/1"
CORRECTION_SCHEMA = "stagelock.correction/2"


class ShiftMessage(TypedDict):
    """One measurement (topic ``stagelock.shift``, schema ``stagelock.shift/2``).

    Shifts are NaN-free: a missing number is ``None`` (JSON ``null``).
    Version 2 added ``position``, ``position_name``, ``channel`` and ``z``: the
    field of view (MDA position index, its name), the channel and the z index of
    the frame, ``None`` where the source does not know them (a single field of
    view). Shifts are relative to that position's own reference.
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
    position: int | None
    position_name: str | None
    channel: str | None
    z: int | None


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
    source: str
    time: float
    alarm: str
    active: bool
    message: str


class CorrectionMessage(TypedDict):
    """A stage move commanded or refused (topic ``stagelock.correction``).

    Built by :meth:`stagelock.stage.Correction.to_message`; the daemon adds
    ``source``. Version 2 (``stagelock.correction/2``) added ``position`` and
    ``position_name`` (None for a single field of view). In an MDA a "move" is
    the change of the position's offset, applied at its next visit by the
    acquisition's own stage move.
    """

    schema: str
    frame: int
    time: float
    move_x_um: float
    move_y_um: float
    stage_x_um: float | None
    stage_y_um: float | None
    residual_dx_px: float | None
    residual_dy_px: float | None
    status: str
    alarm: str | None
    message: str
    position: int | None
    position_name: str | None


class DaemonState(str, Enum):
    """What the daemon is doing (the ``state`` of status messages and replies)."""

    STARTING = "starting"
    """Sinks and source started; no frame yet."""
    REFERENCING = "referencing"
    """Collecting the reference (mean strategy, or waiting for a usable frame)."""
    MEASURING = "measuring"
    """Every frame is measured against the reference."""
    PAUSED = "paused"
    """Frames arrive and are dropped unmeasured (``pause`` command)."""
    SOURCE_LOST = "source_lost"
    """No frame for ``source.stall_timeout_s``."""
    STOPPING = "stopping"
    STOPPED = "stopped"


def finite_or_none(value: float) -> float | None:
    """``value`` as a float, or None when it is NaN or infinite."""
    return float(value) if math.isfinite(value) else None


def encode_body(message: Mapping[str, Any]) -> bytes:
    """Serialise a message body: UTF-8 JSON, NaN/inf as ``null``, never pickle."""
    body = json.dumps(json_safe(message), allow_nan=False, separators=(",", ":"))
    return body.encode("utf-8")


def encode(topic: str, message: Mapping[str, Any]) -> list[bytes]:
    """Encode one published message as two frames: ``[topic, UTF-8 JSON]``."""
    return [topic.encode("ascii"), encode_body(message)]


def json_safe(value: Any) -> Any:
    """Replace NaN/inf floats by None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
