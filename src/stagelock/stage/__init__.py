"""Closed-loop stage correction: calibration, controller, loop, stage drivers."""

from ._calibration import Calibration, CalibrationError, calibrate
from ._controller import DriftVelocityEstimator, control_step_px, lead_time_s
from ._loop import Alarm, Correction, CorrectionStatus, LoopState, StageLoop
from ._mmstage import MMStageDriver
from ._protocol import StageDriver

__all__ = [
    "Alarm",
    "Calibration",
    "CalibrationError",
    "Correction",
    "CorrectionStatus",
    "DriftVelocityEstimator",
    "LoopState",
    "MMStageDriver",
    "StageDriver",
    "StageLoop",
    "calibrate",
    "control_step_px",
    "lead_time_s",
]
