"""Closed-loop stage correction: calibration, controller, loop, stage drivers.

:class:`LockingEngine` (the MDA engine that folds corrections into the
acquisition's own moves) and its helpers are imported on first use, so that
``import stagelock`` does not import pymmcore-plus.
"""

from typing import Any

from ._calibration import Calibration, CalibrationError, calibrate
from ._controller import DriftVelocityEstimator, control_step_px, lead_time_s
from ._loop import Alarm, Correction, CorrectionStatus, LoopState, StageLoop
from ._mmstage import MMStageDriver
from ._positions import (
    LockStatus,
    PositionKey,
    PositionLocks,
    PositionMeasurement,
    PositionState,
    VisitVelocity,
)
from ._protocol import StageDriver

__all__ = [
    "Alarm",
    "Calibration",
    "CalibrationError",
    "Correction",
    "CorrectionStatus",
    "DriftVelocityEstimator",
    "LockSelector",
    "LockStatus",
    "LockingEngine",
    "LoopState",
    "MMStageDriver",
    "PositionKey",
    "PositionLocks",
    "PositionMeasurement",
    "PositionState",
    "StageDriver",
    "StageLoop",
    "VisitVelocity",
    "calibrate",
    "control_step_px",
    "lead_time_s",
]

_LAZY = {"LockSelector", "LockingEngine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import _mda

        return getattr(_mda, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
