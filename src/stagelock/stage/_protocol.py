"""The contract every XY stage driver fulfils."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["StageDriver"]


@runtime_checkable
class StageDriver(Protocol):
    """A motorised XY stage, in stage micrometres.

    Implementations: :class:`~stagelock.control.MMStageDriver` (any pymmcore-plus
    core's XY stage) and :class:`~stagelock.control.PlantStage` (a simulated-time
    plant model for tests). Methods may raise on hardware trouble; callers treat
    any exception as a stage error.
    """

    def get_position_um(self) -> tuple[float, float]:
        """Return the stage's reported (x, y) position in µm."""
        ...

    def move_relative_um(self, dx_um: float, dy_um: float) -> None:
        """Start a relative move by (dx, dy) µm and return without waiting."""
        ...

    def is_busy(self) -> bool:
        """Return True while the stage moves or settles."""
        ...

    def wait(self, timeout_s: float) -> None:
        """Block until the stage is idle.

        Raises
        ------
        TimeoutError
            If it is still busy after ``timeout_s`` seconds.
        """
        ...
