"""Frame sources: where frames come from (Micro-Manager, a folder, a simulation)."""

from ._folder import FolderSource, acquisition_index
from ._mmcore import MMCoreSource, SourceState, release_core
from ._protocol import Frame, FrameCallback, FrameSource
from ._simulated import (
    DriftModel,
    SimulatedMicroscope,
    SimulationSettings,
    create_simulated_core,
)

__all__ = [
    "DriftModel",
    "FolderSource",
    "Frame",
    "FrameCallback",
    "FrameSource",
    "MMCoreSource",
    "SimulatedMicroscope",
    "SimulationSettings",
    "SourceState",
    "acquisition_index",
    "create_simulated_core",
    "release_core",
]
