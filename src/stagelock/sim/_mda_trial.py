"""A multi-position MDA on the simulated microscope, with the truth of every frame.

Used by the tests and ``bench/mda_lock.py``: the drift runs on an
:class:`EventClock` that advances with the MDA's events (time point ``t`` and
position ``p`` fix the time), so the drift the acquisition sees is the same
whatever the machine's load, and a run of 24 time points takes seconds.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import useq

    from stagelock._attach import AttachHandle
    from stagelock.stage._mda import SetupTiming

    from ._microscope import SimulatedCore

__all__ = ["EventClock", "MDATrial", "TrialFrame", "run_mda_trial"]


class EventClock:
    """Simulated time set by the MDA's events: ``t·interval_s + p·position_s``.

    Connect :meth:`on_event` to ``core.mda.events.eventStarted`` (emitted before
    the engine sets the event up), and pass the clock both to the microscope
    (the drift) and to :func:`stagelock.attach` (the lock's time base).
    """

    def __init__(self, interval_s: float = 1.0, position_s: float = 0.1) -> None:
        self.interval_s = float(interval_s)
        self.position_s = float(position_s)
        self.now_s = 0.0
        self._lock = threading.Lock()

    def on_event(self, event: useq.MDAEvent) -> None:
        """Advance to the event's time point and position.

        A hardware-sequenced batch takes its first event's time (the drift does
        not advance inside a batch).
        """
        events = getattr(event, "events", None)
        index = events[0].index if events else event.index
        with self._lock:
            self.now_s = (
                index.get("t", 0) * self.interval_s
                + index.get("p", 0) * self.position_s
            )

    def __call__(self) -> float:
        """Return the current simulated time (s)."""
        with self._lock:
            return self.now_s


@dataclass(frozen=True, slots=True)
class TrialFrame:
    """One frame of the trial and its truth.

    Attributes
    ----------
    index : dict
        The MDA event index.
    true_dx_px, true_dy_px : float
        The true image shift of the frame against its position's first frame
        (same channel and plane): the residual drift the lock left.
    drift_dx_px, drift_dy_px : float
        The image shift the sample's drift alone caused since that first frame:
        what the frame would show without any correction.
    """

    index: dict[str, int]
    true_dx_px: float
    true_dy_px: float
    drift_dx_px: float = math.nan
    drift_dy_px: float = math.nan

    @property
    def residual_px(self) -> float:
        """Length of the true residual."""
        return math.hypot(self.true_dx_px, self.true_dy_px)

    @property
    def uncorrected_px(self) -> float:
        """Length of the drift the frame would show without correction."""
        return math.hypot(self.drift_dx_px, self.drift_dy_px)


@dataclass(frozen=True, slots=True)
class MDATrial:
    """Every frame of a trial, its truth and the lock's timing.

    Attributes
    ----------
    frames : list of TrialFrame
    setup_added_ms_mean, setup_added_ms_max : float
        What the lock added to ``setup_event`` (NaN without the engine).
    n_corrections : int
    setup_timing : SetupTiming or None
        The engine's full timing (None without the engine).
    """

    frames: list[TrialFrame] = field(default_factory=list)
    setup_added_ms_mean: float = math.nan
    setup_added_ms_max: float = math.nan
    n_corrections: int = 0
    setup_timing: SetupTiming | None = None

    def residuals(
        self, position: int, *, from_t: int = 0, uncorrected: bool = False
    ) -> np.ndarray[Any, np.dtype[np.float64]]:
        """Residual lengths (px) of a position's frames from time point ``from_t``.

        With ``uncorrected``: the drift alone (what no lock would have left).
        """
        return np.array(
            [
                f.uncorrected_px if uncorrected else f.residual_px
                for f in self.frames
                if f.index.get("p", 0) == position and f.index.get("t", 0) >= from_t
            ]
        )

    def positions(self) -> list[int]:
        """Return the position indices seen."""
        return sorted({f.index.get("p", 0) for f in self.frames})


def run_mda_trial(
    core: SimulatedCore,
    sequence: useq.MDASequence,
    handle: AttachHandle | None = None,
) -> MDATrial:
    """Run ``sequence`` on ``core`` and return every frame's true residual.

    Parameters
    ----------
    core : SimulatedCore
        The simulated core (its microscope knows the truth).
    sequence : useq.MDASequence
    handle : AttachHandle, optional
        The attached lock; waited for at the end (all lock frames measured).

    Returns
    -------
    MDATrial
    """
    scope = core.simulation
    truth: list[tuple[dict[str, int], tuple[float, float], tuple[float, float]]] = []
    lock = threading.Lock()

    def on_frame(image: Any, event: useq.MDAEvent, meta: Any) -> None:
        # runs right after the snap on the MDA thread: the last render is this frame
        shift = scope.last_true_shift_px or (math.nan, math.nan)
        drift = scope.image_shift_px(scope.true_drift_um())
        with lock:
            truth.append((dict(event.index), shift, drift))

    core.mda.events.frameReady.connect(on_frame)
    try:
        core.mda.run(sequence)
    finally:
        core.mda.events.frameReady.disconnect(on_frame)
    if handle is not None:
        handle.wait_idle(30.0)
    first: dict[tuple[int, ...], tuple[tuple[float, float], tuple[float, float]]] = {}
    frames: list[TrialFrame] = []
    for index, shift, drift in truth:
        key = tuple(index.get(axis, 0) for axis in "pgcz")
        ref, ref_drift = first.setdefault(key, (shift, drift))
        frames.append(
            TrialFrame(
                index,
                shift[0] - ref[0],
                shift[1] - ref[1],
                drift[0] - ref_drift[0],
                drift[1] - ref_drift[1],
            )
        )
    mean_ms = max_ms = math.nan
    n_corr = 0
    timing = None
    if handle is not None:
        n_corr = sum(p.n_corrections for p in handle.positions.values())
        if handle.engine is not None:
            timing = handle.engine.timing
            mean_ms, max_ms = timing.mean_ms, timing.max_ms
    return MDATrial(frames, mean_ms, max_ms, n_corr, timing)
