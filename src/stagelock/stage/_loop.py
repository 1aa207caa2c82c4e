"""StageLoop: turns each measured shift into (at most) one safe stage correction."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from stagelock.config import StageSettings
from stagelock.protocol import CORRECTION_SCHEMA, CorrectionMessage, finite_or_none

from ._controller import (
    DriftVelocityEstimator,
    RateTracker,
    control_step_px,
    lead_time_s,
)

if TYPE_CHECKING:
    from stagelock.registration import ShiftEstimate

    from ._calibration import Calibration
    from ._protocol import StageDriver

__all__ = ["Alarm", "Correction", "CorrectionStatus", "LoopState", "StageLoop"]

logger = logging.getLogger(__name__)


class LoopState(str, Enum):
    """What the loop is doing."""

    OFF = "off"
    """Feedback disabled in the settings: measure only."""
    TRACKING = "tracking"
    """Stage idle; the next settled good frame may cause a correction."""
    SETTLING = "settling"
    """A correction is in flight; frames are not acted upon until it settled."""
    PAUSED = "paused"
    """Paused by :meth:`StageLoop.pause`."""
    STAGE_ERROR = "stage_error"
    """The driver raised; corrections stop until :meth:`StageLoop.resume`."""


class Alarm(str, Enum):
    """Why the loop refused (part of) a correction."""

    TRAVEL_LIMIT = "travel_limit"
    """The correction would leave ``travel_limit_um`` around the start: clipped."""
    LOW_CONFIDENCE = "low_confidence"
    """The frame's shift is not trustworthy (status not ok): no move."""
    LARGE_SHIFT = "large_shift"
    """The shift exceeds ``max_shift_px``: no move (bump, focus loss, wrong sample)."""
    STAGE_ERROR = "stage_error"
    """The stage driver raised: corrections paused, measuring continues."""
    LOCK_LOST = "lock_lost"
    """An MDA position gave unusable lock frames in a row: its offset is held and
    the acquisition continues without new corrections there."""


class CorrectionStatus(str, Enum):
    """Outcome of a :class:`Correction`."""

    MOVED = "moved"
    CLIPPED = "clipped"
    REFUSED = "refused"
    STAGE_ERROR = "stage_error"


@dataclass(frozen=True, slots=True)
class Correction:
    """One stage correction (or one refused correction with its alarm).

    Attributes
    ----------
    frame : int
        Index of the frame that decided it.
    time : float
        That frame's time (s, same clock as ``frame_time_s``).
    move_x_um, move_y_um : float
        Relative move sent to the stage (0 when refused).
    stage_x_um, stage_y_um : float
        Stage position read back before the move (NaN if unreadable).
    residual_dx_px, residual_dy_px : float
        The measured residual that triggered it.
    status : CorrectionStatus
    alarm : Alarm or None
    message : str
        Human-readable detail of the alarm ("" without one).
    position : int or None
        The MDA position index the correction belongs to (None: one field of view).
    position_name : str or None
        That position's name, when it has one.
    """

    frame: int
    time: float
    move_x_um: float
    move_y_um: float
    stage_x_um: float
    stage_y_um: float
    residual_dx_px: float
    residual_dy_px: float
    status: CorrectionStatus
    alarm: Alarm | None = None
    message: str = ""
    position: int | None = None
    position_name: str | None = None

    def to_message(self) -> CorrectionMessage:
        """Build the JSON-ready body of a ``stagelock.correction`` message."""
        return CorrectionMessage(
            schema=CORRECTION_SCHEMA,
            frame=self.frame,
            time=self.time,
            move_x_um=self.move_x_um,
            move_y_um=self.move_y_um,
            stage_x_um=finite_or_none(self.stage_x_um),
            stage_y_um=finite_or_none(self.stage_y_um),
            residual_dx_px=finite_or_none(self.residual_dx_px),
            residual_dy_px=finite_or_none(self.residual_dy_px),
            status=self.status.value,
            alarm=None if self.alarm is None else self.alarm.value,
            message=self.message,
            position=self.position,
            position_name=self.position_name,
        )


AlarmCallback = Callable[[Alarm, str], None]


def _xy(value: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


class StageLoop:
    """Closed-loop drift compensation: call :meth:`update` once per measured frame.

    Parameters
    ----------
    driver : StageDriver
        The XY stage.
    calibration : Calibration
        Camera→stage transform (``stagelock calibrate``).
    settings : StageSettings, optional
        Gains and limits; default :class:`StageSettings` with ``feedback`` on.
    clock : callable, optional
        Time source in the same time base as the ``frame_time_s`` passed to
        :meth:`update` (default ``time.time``, the base of ``Frame.time_s``).
    on_alarm : callable, optional
        ``on_alarm(alarm, message)``, called when an alarm is raised (not on
        every frame it persists). Exceptions in it are logged and ignored.

    Notes
    -----
    State machine (:class:`LoopState`)::

        TRACKING --move--> SETTLING --stage idle--> TRACKING
        any --pause()--> PAUSED --resume()--> TRACKING
        any --driver raised--> STAGE_ERROR --resume()--> TRACKING

    A frame is acted upon only if it was taken ``settle_s`` after the stage was
    seen idle, its status is ok and its shift is within ``max_shift_px``;
    corrections are ``-gain·residual`` plus velocity feed-forward (see
    :mod:`stagelock.control._controller`), shortened to ``max_step_um`` and
    clipped to ``travel_limit_um`` around the *origin*: the stage position at
    the first frame, kept across :meth:`reset` (a new reference) and moved only
    by :meth:`reset_origin`, so rereferencing cannot walk the stage past the
    limit. The drift bookkeeping is relative to the stage position at the
    current reference (:attr:`reference_position_um`), set again after every
    :meth:`reset`. Moves are started and not waited for.
    :meth:`update` is thread-safe with :meth:`pause`/:meth:`resume`.
    """

    def __init__(
        self,
        driver: StageDriver,
        calibration: Calibration,
        settings: StageSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_alarm: AlarmCallback | None = None,
    ) -> None:
        self.driver = driver
        self.calibration = calibration
        self.settings = (
            settings if settings is not None else StageSettings(feedback=True)
        )
        self.clock = clock
        self.on_alarm = on_alarm
        s = self.settings
        self._velocity = DriftVelocityEstimator(
            window_s=s.velocity_window_s,
            min_points=s.velocity_min_points,
            jump_px=s.jump_px,
            max_velocity_px_s=s.max_velocity_px_s,
        )
        self._lock = threading.RLock()
        self._period = RateTracker()
        self._delay = RateTracker()
        self._start: tuple[float, float] | None = None  # the travel-limit origin
        self._ref_pos: tuple[float, float] | None = None  # stage at the reference
        self._pending = False
        self._issue_time = -math.inf
        self._issue_frame_time = -math.inf
        self._settled_after = -math.inf
        self._last_move_frame_time: float | None = None
        self._paused = False
        self._stage_error = False
        self.alarm: Alarm | None = None
        """The alarm currently standing (None when all is well)."""
        self.alarm_message = ""
        self.n_corrections = 0
        self.travelled_um = 0.0
        """Largest distance (per axis) from the start commanded so far."""

    # -- control ------------------------------------------------------------

    @property
    def state(self) -> LoopState:
        """The current :class:`LoopState`."""
        with self._lock:
            if not self.settings.feedback:
                return LoopState.OFF
            if self._stage_error:
                return LoopState.STAGE_ERROR
            if self._paused:
                return LoopState.PAUSED
            return LoopState.SETTLING if self._pending else LoopState.TRACKING

    @property
    def start_position_um(self) -> tuple[float, float] | None:
        """Centre of the travel limit, the origin (None before the first frame)."""
        return self._start

    @property
    def reference_position_um(self) -> tuple[float, float] | None:
        """Stage position at the current reference (None before its first frame)."""
        return self._ref_pos

    @property
    def velocity_px_s(self) -> tuple[float, float] | None:
        """Current drift-velocity estimate (image px/s), None if not yet known."""
        return self._velocity.velocity_px_s

    def pause(self) -> None:
        """Stop correcting (measuring continues); idempotent."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Resume correcting; also clears a stage error and re-reads the stage."""
        with self._lock:
            self._paused = False
            if self._stage_error:
                self._stage_error = False
                self._pending = False
                self._settled_after = self.clock() + self.settings.settle_s
                self._velocity.reset()
            if self.alarm is Alarm.STAGE_ERROR:
                self._clear_alarm()

    def reset(self) -> None:
        """Forget the reference position and drift history (after a new reference).

        The travel-limit origin stays: see :meth:`reset_origin`.
        """
        with self._lock:
            self._ref_pos = None
            self._velocity.reset()
            self._last_move_frame_time = None

    def reset_origin(self) -> None:
        """Centre the travel limit on the stage position at the next frame."""
        with self._lock:
            self._start = None
            self.travelled_um = 0.0

    def restore(
        self,
        origin_um: tuple[float, float] | None,
        reference_position_um: tuple[float, float] | None,
    ) -> None:
        """Continue from a saved origin and reference position (a restart).

        Parameters
        ----------
        origin_um : (x, y) or None
            Centre of the travel limit; None = the next frame's position.
        reference_position_um : (x, y) or None
            Stage position at the reference the daemon resumes with; None = the
            next frame's position.
        """
        with self._lock:
            self._start = _xy(origin_um)
            self._ref_pos = _xy(reference_position_um)
            self._velocity.reset()
            self._last_move_frame_time = None

    def status(self) -> dict[str, Any]:
        """Build a JSON-ready snapshot for the daemon's status reply."""
        with self._lock:
            v = self._velocity.velocity_px_s
            return {
                "state": self.state.value,
                "alarm": None if self.alarm is None else self.alarm.value,
                "alarm_message": self.alarm_message,
                "corrections": self.n_corrections,
                "start_um": None if self._start is None else list(self._start),
                "reference_um": None if self._ref_pos is None else list(self._ref_pos),
                "velocity_px_s": None if v is None else list(v),
                "max_travel_um": self.travelled_um,
            }

    # -- the per-frame step ---------------------------------------------------

    def update(
        self, frame_index: int, frame_time_s: float, estimate: ShiftEstimate
    ) -> Correction | None:
        """Consider one measured frame; maybe start a correction.

        Parameters
        ----------
        frame_index : int
            The frame's index (for the record).
        frame_time_s : float
            When the frame was exposed, in the loop's clock base.
        estimate : ShiftEstimate
            Its displacement relative to the reference.

        Returns
        -------
        Correction or None
            A correction when a move was started, or when an alarm was raised by
            this frame; None when the frame caused nothing (settling, dead band,
            paused, alarm already standing).
        """
        with self._lock:
            if not self.settings.feedback or self._stage_error:
                return None
            try:
                return self._update(frame_index, frame_time_s, estimate)
            except Exception as exc:  # any driver failure: stop moving, keep measuring
                logger.exception("stage error; corrections paused until resume()")
                self._stage_error = True
                self._pending = False
                msg = f"stage driver raised {type(exc).__name__}: {exc}"
                self._raise_alarm(Alarm.STAGE_ERROR, msg)
                return self._record(
                    frame_index, frame_time_s, estimate, CorrectionStatus.STAGE_ERROR
                )

    def _update(
        self, frame_index: int, frame_time_s: float, estimate: ShiftEstimate
    ) -> Correction | None:
        s = self.settings
        now = self.clock()
        if self._start is None or self._ref_pos is None:
            here = self.driver.get_position_um()
            if self._start is None:
                self._start = here
            if self._ref_pos is None:
                self._ref_pos = here
        if self._pending:
            if self.driver.is_busy():
                return None
            self._pending = False
            self._settled_after = now + s.settle_s
            self._delay.add(now - self._issue_frame_time)
        if self._paused or frame_time_s < self._settled_after:
            return None

        # quality gates: never move on a frame that cannot be trusted
        if not estimate.ok:
            return self._refuse(
                Alarm.LOW_CONFIDENCE,
                f"frame {frame_index}: status {estimate.status.value}, "
                f"confidence {estimate.confidence:.2f}",
                frame_index,
                frame_time_s,
                estimate,
            )
        residual = (estimate.dx_px, estimate.dy_px)
        size = math.hypot(*residual)
        if size > s.max_shift_px:
            return self._refuse(
                Alarm.LARGE_SHIFT,
                f"frame {frame_index}: shift {size:.1f} px exceeds max_shift_px "
                f"{s.max_shift_px:g}",
                frame_index,
                frame_time_s,
                estimate,
            )
        if self.alarm in (Alarm.LOW_CONFIDENCE, Alarm.LARGE_SHIFT):
            self._clear_alarm()

        # the stage is idle and the frame shows its settled position: the drift
        # itself is the residual minus the image shift of the stage's travel
        pos = self.driver.get_position_um()
        start, ref = self._start, self._ref_pos
        stage_px = self.calibration.um_to_px(pos[0] - ref[0], pos[1] - ref[1])
        self._velocity.add(
            frame_time_s, residual[0] - stage_px[0], residual[1] - stage_px[1]
        )
        velocity = self._velocity.velocity_px_s if s.feed_forward else None
        lead = lead_time_s(self._period.value, self._delay.value, s.gain)
        want_px = control_step_px(residual, velocity, gain=s.gain, lead_s=lead)
        if size < s.dead_band_px and math.hypot(*want_px) < s.dead_band_px:
            return None
        if (
            self._last_move_frame_time is not None
            and frame_time_s - self._last_move_frame_time < s.min_interval_s
        ):
            return None

        mx, my = self.calibration.px_to_um(*want_px)
        length = math.hypot(mx, my)
        if length > s.max_step_um:
            mx, my = mx * s.max_step_um / length, my * s.max_step_um / length
        # travel limit: clip the target into the box around the start
        limit = s.travel_limit_um
        tx = min(max(pos[0] + mx, start[0] - limit), start[0] + limit)
        ty = min(max(pos[1] + my, start[1] - limit), start[1] + limit)
        clipped = abs(tx - (pos[0] + mx)) > 1e-9 or abs(ty - (pos[1] + my)) > 1e-9
        mx, my = tx - pos[0], ty - pos[1]
        status = CorrectionStatus.MOVED
        if clipped:
            status = CorrectionStatus.CLIPPED
            self._raise_alarm(
                Alarm.TRAVEL_LIMIT,
                f"correction clipped at the travel limit ±{limit:g} µm around "
                f"({start[0]:.2f}, {start[1]:.2f}) µm",
            )
        elif self.alarm is Alarm.TRAVEL_LIMIT:
            self._clear_alarm()
        if math.hypot(mx, my) < 1e-9:
            return self._record(
                frame_index, frame_time_s, estimate, CorrectionStatus.REFUSED, pos=pos
            )

        self.driver.move_relative_um(mx, my)
        self._pending = True
        self._issue_time = now
        self._issue_frame_time = frame_time_s
        if self._last_move_frame_time is not None:
            self._period.add(frame_time_s - self._last_move_frame_time)
        self._last_move_frame_time = frame_time_s
        self.n_corrections += 1
        self.travelled_um = max(
            self.travelled_um, abs(tx - start[0]), abs(ty - start[1])
        )
        return self._record(
            frame_index, frame_time_s, estimate, status, pos=pos, move=(mx, my)
        )

    # -- helpers ----------------------------------------------------------------

    def _refuse(
        self,
        alarm: Alarm,
        message: str,
        frame_index: int,
        frame_time_s: float,
        estimate: ShiftEstimate,
    ) -> Correction | None:
        if self.alarm is alarm:
            return None  # already standing: one record per episode, not per frame
        self._raise_alarm(alarm, message)
        return self._record(
            frame_index, frame_time_s, estimate, CorrectionStatus.REFUSED
        )

    def _record(
        self,
        frame_index: int,
        frame_time_s: float,
        estimate: ShiftEstimate,
        status: CorrectionStatus,
        *,
        pos: tuple[float, float] = (math.nan, math.nan),
        move: tuple[float, float] = (0.0, 0.0),
    ) -> Correction:
        return Correction(
            frame=int(frame_index),
            time=float(frame_time_s),
            move_x_um=float(move[0]),
            move_y_um=float(move[1]),
            stage_x_um=float(pos[0]),
            stage_y_um=float(pos[1]),
            residual_dx_px=float(estimate.dx_px),
            residual_dy_px=float(estimate.dy_px),
            status=status,
            alarm=self.alarm if status is not CorrectionStatus.MOVED else None,
            message=self.alarm_message if status is not CorrectionStatus.MOVED else "",
        )

    def _raise_alarm(self, alarm: Alarm, message: str) -> None:
        new = alarm is not self.alarm
        self.alarm = alarm
        self.alarm_message = message
        if new:
            logger.warning("stage alarm %s: %s", alarm.value, message)
            if self.on_alarm is not None:
                try:
                    self.on_alarm(alarm, message)
                except Exception:
                    logger.exception("on_alarm callback failed")

    def _clear_alarm(self) -> None:
        self.alarm = None
        self.alarm_message = ""
