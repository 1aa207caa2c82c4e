"""Everything simulated: synthetic movies, the simulated microscope, stage models.

The truth is known everywhere here, so tests and benchmarks can measure errors:

* :func:`create_simulated_core` — a pymmcore-plus ``UniMMCore`` with a Python
  camera and XY stage imaging a real, drifting sample (the default source of
  ``stagelock run``);
* :func:`sample_image`, :func:`drifting_stack`, :func:`random_drift`,
  :class:`CameraNoise` — synthetic movies with a known drift;
* :class:`StageMechanics` — the one stage model (speed, settle, quantisation,
  backlash), in real time inside the microscope and in simulated time in
  :class:`PlantStage`;
* :func:`run_simulated` — a closed-loop run on the simulated microscope
  (``stagelock demo``).
"""

from ._demo import DemoTrace, calibration_of, run_simulated, summarize
from ._mda_trial import EventClock, MDATrial, TrialFrame, run_mda_trial
from ._microscope import (
    CAMERA_LABEL,
    XY_STAGE_LABEL,
    DriftModel,
    SimulatedCore,
    SimulatedMicroscope,
    create_simulated_core,
)
from ._plant import PlantStage, SimClock
from ._stage import StageMechanics
from ._synthetic import (
    CameraNoise,
    drifting_stack,
    fourier_shift,
    random_drift,
    sample_image,
)

__all__ = [
    "CAMERA_LABEL",
    "XY_STAGE_LABEL",
    "CameraNoise",
    "DemoTrace",
    "DriftModel",
    "EventClock",
    "MDATrial",
    "PlantStage",
    "SimClock",
    "SimulatedCore",
    "SimulatedMicroscope",
    "StageMechanics",
    "TrialFrame",
    "calibration_of",
    "create_simulated_core",
    "drifting_stack",
    "fourier_shift",
    "random_drift",
    "run_mda_trial",
    "run_simulated",
    "sample_image",
    "summarize",
]
