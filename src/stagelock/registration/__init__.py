"""Translation registration: frames in, sub-pixel shifts out."""

from ._budget import coverage_for_interval
from ._crlb import ShiftBound, camera_variance, shift_crlb
from ._registrar import Registrar
from ._stack import estimate_shifts, iter_estimates, shift_image
from ._types import ShiftEstimate, Status

__all__ = [
    "Registrar",
    "ShiftBound",
    "ShiftEstimate",
    "Status",
    "camera_variance",
    "coverage_for_interval",
    "estimate_shifts",
    "iter_estimates",
    "shift_crlb",
    "shift_image",
]
