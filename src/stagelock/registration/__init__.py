"""Translation registration: frames in, sub-pixel shifts out."""

from ._registrar import Registrar
from ._stack import estimate_shifts, iter_estimates, shift_image
from ._types import ShiftEstimate, Status

__all__ = [
    "Registrar",
    "ShiftEstimate",
    "Status",
    "estimate_shifts",
    "iter_estimates",
    "shift_image",
]
