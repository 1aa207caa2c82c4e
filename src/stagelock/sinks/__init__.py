"""Sinks: where measurements go (ZeroMQ publisher, record file)."""

from ._protocol import (
    ALARM_SCHEMA,
    ALARM_TOPIC,
    SHIFT_SCHEMA,
    SHIFT_TOPIC,
    STATUS_SCHEMA,
    STATUS_TOPIC,
    AlarmMessage,
    ShiftMessage,
    ShiftSink,
    StatusMessage,
    json_safe,
)
from ._publisher import ZmqPublisher
from ._recorder import SHIFT_COLUMNS, Recorder

__all__ = [
    "ALARM_SCHEMA",
    "ALARM_TOPIC",
    "SHIFT_COLUMNS",
    "SHIFT_SCHEMA",
    "SHIFT_TOPIC",
    "STATUS_SCHEMA",
    "STATUS_TOPIC",
    "AlarmMessage",
    "Recorder",
    "ShiftMessage",
    "ShiftSink",
    "StatusMessage",
    "ZmqPublisher",
    "json_safe",
]
