"""Values that leave the registration engine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

__all__ = ["ShiftEstimate", "Status"]


class Status(str, Enum):
    """Outcome of one measurement.

    Only ``OK`` and ``LOW_CONFIDENCE`` carry numbers; the other states report NaN
    shifts because no trustworthy number exists for that frame.
    """

    OK = "ok"
    """Several template regions agree; the shift can be used."""
    LOW_CONFIDENCE = "low_confidence"
    """A shift was found but its correlation or agreement is weak: record, don't act."""
    BLANK = "blank"
    """The frame has (almost) no intensity variation: shutter closed, lamp off."""
    SATURATED = "saturated"
    """Too many pixels sit at the saturation level to trust the match."""
    NO_PEAK = "no_peak"
    """No correlation peak stands out in any template region."""
    OUT_OF_RANGE = "out_of_range"
    """The best match lies at the edge of the capture range: the drift exceeds it."""

    @property
    def has_shift(self) -> bool:
        """Whether an estimate in this state carries finite ``dx_px``/``dy_px``."""
        return self in (Status.OK, Status.LOW_CONFIDENCE)


@dataclass(frozen=True, slots=True)
class ShiftEstimate:
    """The measured displacement of a frame's content relative to the reference.

    Shifting the frame by ``(-dx_px, -dy_px)`` aligns it with the reference.

    Attributes
    ----------
    dx_px, dy_px : float
        Displacement along columns (x) and rows (y) in pixels; NaN when ``status``
        carries no shift.
    confidence : float
        0..1: median normalised-correlation peak of the agreeing template regions,
        times the fraction of regions that agree.
    status : Status
        Whether the numbers can be trusted (see :class:`Status`).
    n_regions : int
        Number of template regions that agreed on the shift (0 when none did).
    sigma_px : float
        Estimated 1-σ uncertainty of the shift (per axis, pixels), the
        reference's noise included: the Gauss-Newton covariance of the agreeing
        regions scaled to their scatter, or the whole-frame fit's covariance
        at its measured noise; NaN without a shift.
    """

    dx_px: float
    dy_px: float
    confidence: float
    status: Status
    n_regions: int = 0
    sigma_px: float = math.nan

    @property
    def dx(self) -> float:
        """Alias of :attr:`dx_px`."""
        return self.dx_px

    @property
    def dy(self) -> float:
        """Alias of :attr:`dy_px`."""
        return self.dy_px

    @property
    def ok(self) -> bool:
        """True when the status is :attr:`Status.OK`."""
        return self.status is Status.OK

    @classmethod
    def at_reference(cls, n_regions: int) -> ShiftEstimate:
        """Build the reference's estimate against itself: zero, ``ok``, confidence 1.

        Not measured (the fit would return zero to rounding): the frame that
        became the reference is reported with this, so frame 0 is exactly 0.
        """
        return cls(0.0, 0.0, 1.0, Status.OK, n_regions, 0.0)

    @classmethod
    def failed(cls, status: Status, confidence: float = 0.0) -> ShiftEstimate:
        """Build an estimate that carries no shift."""
        return cls(math.nan, math.nan, float(confidence), status, 0, math.nan)
