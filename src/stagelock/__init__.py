"""stagelock: hold a microscope's field of view still while it acquires.

Measure every frame's sub-pixel XY drift against a reference, publish it, record
it, and optionally feed it back to the motorised stage.
"""

from importlib.metadata import PackageNotFoundError, version

from ._attach import AttachHandle, FrameShift, attach
from .batch import register_many
from .registration import (
    Registrar,
    ShiftEstimate,
    Status,
    estimate_shifts,
    iter_estimates,
    shift_image,
)

try:
    __version__ = version("stagelock")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "unknown"

Shift = ShiftEstimate
"""Alias of :class:`ShiftEstimate`."""

__all__ = [
    "AttachHandle",
    "FrameShift",
    "Registrar",
    "Shift",
    "ShiftEstimate",
    "Status",
    "__version__",
    "attach",
    "estimate_shifts",
    "iter_estimates",
    "register_many",
    "shift_image",
]
