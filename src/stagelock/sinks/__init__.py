"""Sinks: where measurements go (ZeroMQ publisher, record file)."""

from ._protocol import ShiftSink
from ._publisher import ZmqPublisher
from ._recorder import SHIFT_COLUMNS, Recorder

__all__ = ["SHIFT_COLUMNS", "Recorder", "ShiftSink", "ZmqPublisher"]
