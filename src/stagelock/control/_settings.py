"""Validated settings of the stage loop and the calibration (``[stage]``)."""

from __future__ import annotations

from pathlib import Path  # noqa: TC003 - pydantic needs it at run time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CalibrationSettings", "StageSettings"]


class CalibrationSettings(BaseModel):
    """How ``stagelock calibrate`` moves the stage (``[stage.calibration]``).

    Attributes
    ----------
    step_um : float, optional
        Stage step of the pattern; default: probed so that a step moves the image
        by ~``target_shift_px``.
    target_shift_px : float
        Image shift aimed at by the automatic step.
    pattern : {"cross", "grid"}
        ``cross``: ±x, ±y; ``grid``: the 8 neighbours of a 3×3 grid. The start
        position is revisited between points, so linear drift during the
        calibration is fitted and removed.
    approach_um : float, optional
        Every position is approached from the same side after a pre-move of this
        size, so backlash shifts all points equally; default 20 % of the step.
    settle_s : float
        Extra wait after the stage reports idle, before snapping.
    max_residual_px : float
        Refuse a fit whose RMS residual exceeds this.
    max_anisotropy : float
        Refuse a fit whose two singular values differ by more than this fraction
        (strong skew or a degenerate, e.g. one-axis, response).
    move_timeout_s : float
        Maximum wait for one move.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_um: float | None = Field(default=None, gt=0)
    target_shift_px: float = Field(default=15.0, gt=0)
    pattern: Literal["cross", "grid"] = "cross"
    approach_um: float | None = Field(default=None, ge=0)
    settle_s: float = Field(default=0.05, ge=0)
    max_residual_px: float = Field(default=0.5, gt=0)
    max_anisotropy: float = Field(default=0.1, ge=0)
    move_timeout_s: float = Field(default=10.0, gt=0)


class StageSettings(BaseModel):
    """Closed-loop stage compensation (the config's ``[stage]`` section).

    Attributes
    ----------
    feedback : bool
        Move the stage to cancel the measured drift. Off: measure only.
    device : str, optional
        XY stage label; default the core's current XY stage.
    calibration_file : path, optional
        TOML written by ``stagelock calibrate``. Required when ``feedback`` is on,
        unless ``auto_calibrate`` is set or the source is the simulated
        microscope (both calibrate at start-up instead).
    auto_calibrate : bool
        Without ``calibration_file``: run the calibration on the live core when
        the daemon starts, before measuring.
    gain : float
        Fraction of the measured residual corrected per move (0 < gain ≤ 1).
    dead_band_px : float
        Residuals smaller than this (and predicted corrections smaller than
        this) cause no move: avoids hunting around the stage's resolution.
    max_step_um : float
        Largest single correction (vector length); larger ones are shortened.
    min_interval_s : float
        Minimum time between two corrections.
    settle_s : float
        Time after the stage reports idle before a frame counts as settled
        (should cover the exposure time).
    max_shift_px : float
        A larger measured shift raises an alarm instead of a move.
    travel_limit_um : float
        The stage never goes further than this from its start position, per axis.
    feed_forward : bool
        Add the estimated drift velocity times the loop delay to each move,
        removing the lag on linear creep.
    velocity_window_s : float
        History used by the robust drift-velocity fit.
    velocity_min_points : int
        Settled frames needed before feed-forward starts.
    jump_px : float
        A drift jump larger than this resets the velocity history (a bump is
        not creep).
    max_velocity_px_s : float
        Cap on the feed-forward velocity.
    calibration : CalibrationSettings
        How ``stagelock calibrate`` runs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    feedback: bool = False
    device: str | None = None
    calibration_file: Path | None = None
    auto_calibrate: bool = False
    gain: float = Field(default=0.7, gt=0, le=1)
    dead_band_px: float = Field(default=0.1, ge=0)
    max_step_um: float = Field(default=5.0, gt=0)
    min_interval_s: float = Field(default=0.0, ge=0)
    settle_s: float = Field(default=0.02, ge=0)
    max_shift_px: float = Field(default=20.0, gt=0)
    travel_limit_um: float = Field(default=100.0, gt=0)
    feed_forward: bool = True
    velocity_window_s: float = Field(default=8.0, gt=0)
    velocity_min_points: int = Field(default=6, ge=3)
    jump_px: float = Field(default=2.0, gt=0)
    max_velocity_px_s: float = Field(default=5.0, gt=0)
    calibration: CalibrationSettings = CalibrationSettings()
