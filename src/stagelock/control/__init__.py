"""Closed-loop stage control: calibration, controller, stage drivers."""

from ._calibration import Calibration, CalibrationError, calibrate
from ._controller import DriftVelocityEstimator, control_step_px, lead_time_s
from ._loop import Alarm, Correction, CorrectionStatus, LoopState, StageLoop
from ._mmstage import MMStageDriver
from ._plant import PlantStage, SimClock
from ._protocol import StageDriver
from ._settings import CalibrationSettings, StageSettings

__all__ = [
    "Alarm",
    "Calibration",
    "CalibrationError",
    "CalibrationSettings",
    "Correction",
    "CorrectionStatus",
    "DriftVelocityEstimator",
    "LoopState",
    "MMStageDriver",
    "PlantStage",
    "SimClock",
    "StageDriver",
    "StageLoop",
    "StageSettings",
    "calibrate",
    "control_step_px",
    "lead_time_s",
]
