"""Closed-loop runs on the simulated microscope (``stagelock demo``, bench, tests)."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stagelock.config import StageSettings
from stagelock.registration import Registrar
from stagelock.stage import Calibration, Correction, MMStageDriver, StageLoop

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["DemoTrace", "calibration_of", "run_simulated", "summarize"]


@dataclass
class DemoTrace:
    """Per-frame record of a simulated run (true values from the simulator).

    Attributes
    ----------
    time_s : (N,) array
        Frame times since the first frame.
    true_px : (N, 2) array
        True displacement of the frame relative to the reference (the residual
        when feedback is on, the drift when off).
    measured_px : (N, 2) array
        What the registration measured (NaN where it failed).
    stage_um : (N, 2) array
        Stage read-back relative to the start.
    corrections : list of Correction
    bump_frame : int or None
        Frame at which the bump was injected.
    bump_px : (dx, dy)
        Its image-space size.
    t0_s : float
        Clock time of the first frame (``Correction.time`` is in that base).
    """

    time_s: npt.NDArray[np.float64]
    true_px: npt.NDArray[np.float64]
    measured_px: npt.NDArray[np.float64]
    stage_um: npt.NDArray[np.float64]
    corrections: list[Correction] = field(default_factory=list)
    bump_frame: int | None = None
    bump_px: tuple[float, float] = (0.0, 0.0)
    t0_s: float = 0.0


def run_simulated(
    core: Any,
    n_frames: int,
    *,
    feedback: bool = True,
    calibration: Calibration | None = None,
    settings: StageSettings | None = None,
    interval_s: float = 0.0,
    bump_frame: int | None = None,
    bump_px: tuple[float, float] = (10.0, 0.0),
    on_frame: Callable[[int, DemoTrace], None] | None = None,
) -> DemoTrace:
    """Run a snap → measure → correct loop on a simulated-microscope core.

    Parameters
    ----------
    core : UniMMCore
        From :func:`stagelock.sources._simulated.create_simulated_core`.
    n_frames : int
        Frames to acquire.
    feedback : bool
        Correct the stage (else only measure: the open-loop control run).
    calibration : Calibration, optional
        Default: the simulator's true geometry.
    settings : StageSettings, optional
        Loop settings (``feedback`` is forced to ``feedback``).
    interval_s : float
        Minimum frame period (0: as fast as the camera snaps).
    bump_frame : int, optional
        Before this frame, shift the sample by ``bump_px`` (a knock on the
        stage: the stage is moved behind the loop's back).
    bump_px : (dx, dy)
        Image-space size of the bump.
    on_frame : callable, optional
        ``on_frame(index, trace_so_far)`` after every frame (live display).

    Returns
    -------
    DemoTrace
    """
    scope = core.simulation
    truth = calibration_of(scope)
    cal = calibration or truth
    base = settings or StageSettings()
    settings = base.model_copy(update={"feedback": feedback})
    driver = MMStageDriver(core)
    loop = StageLoop(driver, cal, settings, clock=time.time)

    def snap() -> tuple[npt.NDArray[Any], float, tuple[float, float]]:
        t = time.time()
        core.snapImage()
        image = core.getImage()
        true = scope.true_image_shift_px(scope.elapsed_s() - _exposure_s(core) / 2)
        return image, t, true

    image, t0, true0 = snap()
    registrar = Registrar(image, max_shift_px=min(50.0, 0.2 * min(image.shape)))
    start = driver.get_position_um()
    times: list[float] = []
    trues: list[tuple[float, float]] = []
    meas: list[tuple[float, float]] = []
    stages: list[tuple[float, float]] = []
    trace = DemoTrace(np.zeros(0), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)))
    trace.bump_frame = bump_frame
    trace.bump_px = bump_px
    trace.t0_s = t0
    for k in range(n_frames):
        if k == bump_frame:
            # a knock: the stage jumps by the move that shifts the image by bump_px
            driver.move_relative_um(*truth.px_to_um(*bump_px))
            driver.wait(5.0)
        t_next = t0 + k * interval_s
        while interval_s > 0 and time.time() < t_next:
            time.sleep(min(0.005, t_next - time.time()))
        image, t, true = snap()
        est = registrar.measure(image)
        correction = loop.update(k, t, est)
        if correction is not None:
            trace.corrections.append(correction)
        x, y = driver.get_position_um()
        times.append(t - t0)
        trues.append((true[0] - true0[0], true[1] - true0[1]))
        meas.append((est.dx_px, est.dy_px))
        stages.append((x - start[0], y - start[1]))
        if on_frame is not None:
            trace.time_s = np.array(times)
            trace.true_px = np.array(trues)
            trace.measured_px = np.array(meas)
            trace.stage_um = np.array(stages)
            on_frame(k, trace)
    trace.time_s = np.array(times)
    trace.true_px = np.array(trues)
    trace.measured_px = np.array(meas)
    trace.stage_um = np.array(stages)
    return trace


def _exposure_s(core: Any) -> float:
    return float(core.getExposure()) / 1000.0


def calibration_of(scope: Any) -> Calibration:
    """Return the exact (ground-truth) calibration of a simulated microscope."""
    camera = np.asarray(scope.settings.camera_matrix, dtype=np.float64)
    # a stage move m shifts the image by -camera @ m
    return Calibration.from_matrix(np.linalg.inv(-camera))


def summarize(
    trace: DemoTrace, *, lock_frames: int = 20, bump_window_s: float = 3.0
) -> Mapping[str, Any]:
    """Compute the acceptance numbers of a closed-loop trace (``bench/closed_loop``).

    Returns
    -------
    dict
        ``residual_rms_px`` (after the first ``lock_frames``, outside the bump
        recovery window), ``overshoot_pct`` (largest excursion past zero after
        the bump, along the bump, in % of the bump), ``max_alternation`` (longest
        run of sign alternations of successive corrections along the dominant
        correction axis, outside the bump window), ``oscillating`` (that run
        > 5), ``max_travel_um`` (largest stage excursion per axis).
    """
    t = trace.time_s
    r = trace.true_px
    keep = np.arange(len(t)) >= lock_frames
    overshoot = 0.0
    t_bump = math.inf
    if trace.bump_frame is not None and trace.bump_frame < len(t):
        t_bump = t[trace.bump_frame]
        after = (t >= t_bump) & (t < t_bump + bump_window_s)
        keep &= ~after
        b = np.asarray(trace.bump_px, dtype=np.float64)
        size = float(np.hypot(*b))
        along = r[after] @ (b / size)
        # the bump shows as +size along b; overshoot is how far it goes negative
        overshoot = max(0.0, -float(along.min()) if along.size else 0.0) / size * 100
    residual = (
        float(np.sqrt(np.mean(np.sum(r[keep] ** 2, axis=1))))
        if keep.any()
        else math.nan
    )
    moves = np.array(
        [
            (c.move_x_um, c.move_y_um)
            for c in trace.corrections
            if c.move_x_um or c.move_y_um
            if not (t_bump <= c.time - trace.t0_s < t_bump + bump_window_s)
        ]
    ).reshape(-1, 2)
    run = _max_alternation(moves)
    travel = float(np.abs(trace.stage_um).max()) if trace.stage_um.size else 0.0
    return {
        "residual_rms_px": residual,
        "overshoot_pct": overshoot,
        "max_alternation": run,
        "oscillating": run > 5,
        "max_travel_um": travel,
        "n_corrections": len(moves),
    }


def _max_alternation(moves: npt.NDArray[np.float64]) -> int:
    if len(moves) < 2:
        return 0
    axis = int(np.argmax(np.abs(moves).sum(axis=0)))
    signs = np.sign(moves[:, axis])
    signs = signs[signs != 0]
    best = run = 0
    for a, b in itertools.pairwise(signs):
        run = run + 1 if a != b else 0
        best = max(best, run)
    return best
