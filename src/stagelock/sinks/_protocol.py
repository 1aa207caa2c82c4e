"""The contract every sink fulfils."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ShiftSink"]


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
