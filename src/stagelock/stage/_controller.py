"""The control law: residual drift (px) in, stage correction (px of image) out.

The plant is a stage that integrates the commanded moves, seen through a camera
with a delay (a move takes effect only after it has travelled and settled, and only
frames exposed after that show it). The measured shift is relative to the
reference image, so after the stage has moved it already *is* the residual error
``e = drift + A @ (stage - start)``: the controller needs no integrator of its
own — the stage is the integrator — and acts only on frames taken after the
previous move settled, which makes each correction a fresh measurement of the
full residual. With gain ``g ≤ 1`` the residual then decays as ``(1 - g)^n``
without overshoot.

On linear creep at ``v`` px/s such a loop lags by ``v·T/g`` (``T``: time between
corrections). The feed-forward removes it: the drift itself is reconstructed as
``drift = e - A @ (stage - start)``, its velocity is fitted robustly (Theil–Sen)
over a sliding window, and each move adds ``v̂·L`` with the lead ``L`` chosen so
that the residual's sawtooth between corrections is centred on zero
(``L = T·(1 - g/2) + g·delay``).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

__all__ = ["DriftVelocityEstimator", "RateTracker", "control_step_px", "lead_time_s"]


class DriftVelocityEstimator:
    """Robust drift velocity (px/s) from ``(time, drift)`` samples.

    Parameters
    ----------
    window_s : float
        Only samples this recent are fitted.
    min_points : int
        Below this many samples (or a time span under 1 s) no estimate exists.
    jump_px : float
        A sample further than this from the prediction resets the history: a
        bump is a step, not a velocity, and would bias the fit.
    max_velocity_px_s : float
        The estimate is clipped to this magnitude.

    Notes
    -----
    Theil–Sen: the median of the pairwise slopes, per axis, tolerates ~29 % of
    outliers (frames measured mid-move, backlash jumps in the reconstructed drift)
    [1]_.

    References
    ----------
    .. [1] P. K. Sen, "Estimates of the regression coefficient based on Kendall's
       tau", JASA 63(324), 1379-1389 (1968), :doi:`10.1080/01621459.1968.10480934`.
    """

    def __init__(
        self,
        *,
        window_s: float = 8.0,
        min_points: int = 6,
        jump_px: float = 2.0,
        max_velocity_px_s: float = 5.0,
        max_points: int = 120,
    ) -> None:
        self.window_s = float(window_s)
        self.min_points = int(min_points)
        self.jump_px = float(jump_px)
        self.max_velocity_px_s = float(max_velocity_px_s)
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=max_points)
        self._velocity: tuple[float, float] | None = None
        self.resets = 0

    def reset(self) -> None:
        """Forget the history."""
        self._samples.clear()
        self._velocity = None

    def add(self, time_s: float, drift_x_px: float, drift_y_px: float) -> None:
        """Add one sample; may reset the history on a jump."""
        if self._samples:
            t0, x0, y0 = self._samples[-1]
            vx, vy = self._velocity or (0.0, 0.0)
            dt = time_s - t0
            if (
                math.hypot(drift_x_px - x0 - vx * dt, drift_y_px - y0 - vy * dt)
                > self.jump_px
            ):
                self.reset()
                self.resets += 1
        self._samples.append((float(time_s), float(drift_x_px), float(drift_y_px)))
        while self._samples and self._samples[0][0] < time_s - self.window_s:
            self._samples.popleft()
        self._velocity = self._fit()

    def _fit(self) -> tuple[float, float] | None:
        if len(self._samples) < self.min_points:
            return None
        data = np.array(self._samples)
        t = data[:, 0]
        if t[-1] - t[0] < 1.0:
            return None
        i, j = np.triu_indices(len(t), k=1)
        dt = t[j] - t[i]
        keep = dt > 1e-6
        vx = float(np.median((data[j, 1] - data[i, 1])[keep] / dt[keep]))
        vy = float(np.median((data[j, 2] - data[i, 2])[keep] / dt[keep]))
        speed = math.hypot(vx, vy)
        if speed > self.max_velocity_px_s:
            vx, vy = (
                vx * self.max_velocity_px_s / speed,
                vy * self.max_velocity_px_s / speed,
            )
        return vx, vy

    @property
    def velocity_px_s(self) -> tuple[float, float] | None:
        """The current estimate ``(vx, vy)`` in px/s, or None if not enough data."""
        return self._velocity


class RateTracker:
    """Exponential moving average of a duration (s); None until the first sample."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = float(alpha)
        self.value: float | None = None

    def add(self, value_s: float) -> None:
        """Fold in one observation."""
        v = max(0.0, float(value_s))
        self.value = (
            v if self.value is None else self.value + self.alpha * (v - self.value)
        )


def lead_time_s(period_s: float | None, delay_s: float | None, gain: float) -> float:
    """Feed-forward lead that centres the residual sawtooth on zero.

    Parameters
    ----------
    period_s : float or None
        Typical time between corrections ``T``.
    delay_s : float or None
        Typical time from a frame's exposure to its correction taking effect.
    gain : float
        The loop gain ``g``.

    Returns
    -------
    float
        ``T·(1 - g/2) + g·delay`` (unknown terms count as 0).
    """
    t = period_s or 0.0
    d = delay_s or 0.0
    return t * (1.0 - gain / 2.0) + gain * d


def control_step_px(
    residual_px: tuple[float, float],
    velocity_px_s: tuple[float, float] | None,
    *,
    gain: float,
    lead_s: float,
) -> tuple[float, float]:
    """Compute the image shift a correction should produce.

    Parameters
    ----------
    residual_px : (dx, dy)
        Measured displacement of the frame relative to the reference.
    velocity_px_s : (vx, vy) or None
        Estimated drift velocity (None: no feed-forward).
    gain : float
        Fraction of the residual removed per correction.
    lead_s : float
        How far ahead the drift is anticipated.

    Returns
    -------
    (dx_px, dy_px)
        ``-(gain·residual + velocity·lead)``; the stage move is
        ``calibration.px_to_um(*this)``.
    """
    vx, vy = velocity_px_s or (0.0, 0.0)
    return (
        -(gain * residual_px[0] + vx * lead_s),
        -(gain * residual_px[1] + vy * lead_s),
    )
