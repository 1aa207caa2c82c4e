"""Per-position lock state for multi-position acquisitions (useq MDAs).

An MDA visits several stage positions, minutes apart, each imaging different
sample. One reference cannot span them: every position keeps its own reference,
shift history, drift velocity and applied stage offset here. The table is fed
the *lock frames* (one channel, one z plane per position and time point) on a
worker thread and asked, in the acquisition thread, which offset the next visit
of a position should carry (:meth:`PositionLocks.offset_for`, a few µs: no
fitting happens there).

The model of one position
-------------------------
The measured shift ``s`` of a lock frame against the position's reference is
the sample's drift ``d`` (image px since the reference) plus the image shift of
the offset that frame was taken at, relative to the reference's offset::

    s = d + A @ (offset_frame - offset_ref)      A = calibration.um_to_px

so ``d = s - A @ (offset_frame - offset_ref)`` uses the offset *actually
commanded* for that frame (carried with the frame, never re-read or pre-fetched).
The drift velocity ``v`` is a Theil–Sen fit over the last visits; the next visit
at time ``t`` is predicted to have drifted ``d(t) = d_k + v·(t - t_k)`` and gets
``offset = offset_ref + A⁻¹ @ (-d(t))`` (feed-forward: visits are far apart, so
correcting only what was seen would always lag one visit behind).

Safety: a lock frame whose status is not ok or whose shift exceeds
``max_shift_px`` changes nothing (the offset is held, no extrapolation);
``lost_after`` such frames in a row mark the position's lock lost (an alarm
naming it; the acquisition goes on at the held offset). Offsets are clipped to
``travel_limit_um`` per axis around the position's planned coordinates.

Size: over 600 lines because per-position references, offsets, velocity and
lost-lock alarms are one state per position, updated together.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from stagelock.registration import Registrar, ShiftEstimate

from ._loop import Alarm, Correction, CorrectionStatus

if TYPE_CHECKING:
    import numpy.typing as npt

    from ._calibration import Calibration

__all__ = [
    "LockStatus",
    "PositionKey",
    "PositionLocks",
    "PositionMeasurement",
    "PositionState",
    "VisitVelocity",
]

logger = logging.getLogger(__name__)

AlarmCallback = Callable[["PositionKey", Alarm, str], None]


@dataclass(frozen=True, slots=True, order=True)
class PositionKey:
    """Which field of view a frame belongs to.

    Attributes
    ----------
    p : int
        The MDA position index (``event.index["p"]``); 0 for snapped images and
        MDAs without stage positions.
    g : int or None
        The grid index inside the position (``event.index["g"]``), if any: grid
        tiles image different sample, so each gets its own reference.
    """

    p: int = 0
    g: int | None = None

    @classmethod
    def of_index(cls, index: Mapping[str, int]) -> PositionKey:
        """Build the key of an MDA event index (``{"t": 3, "p": 1, "g": 2}``)."""
        g = index.get("g")
        return cls(int(index.get("p", 0)), None if g is None else int(g))

    @property
    def label(self) -> str:
        """``"1"`` or ``"1/g2"`` (for logs and alarms)."""
        return str(self.p) if self.g is None else f"{self.p}/g{self.g}"


class LockStatus(str, Enum):
    """Where a position's lock stands."""

    WAITING = "waiting"
    """No reference yet (the position was not imaged on the lock channel)."""
    OK = "ok"
    """The last lock frame was measured and used."""
    REFUSED = "refused"
    """The last lock frame was not trusted (low confidence or too large a shift);
    the offset is held."""
    LOST = "lost"
    """``lost_after`` unusable lock frames in a row: alarm raised, offset held,
    the acquisition continues without new corrections until a good frame."""


@dataclass(frozen=True, slots=True)
class PositionState:
    """A snapshot of one position's lock (``lock.positions[key]``).

    Attributes
    ----------
    key : PositionKey
    name : str or None
        The position's ``pos_name``.
    status : LockStatus
    reference : ndarray or None
        The reference frame (the first usable lock frame at this position).
    last_dx_px, last_dy_px : float
        The last measured shift against the reference (NaN before one).
    offset_x_um, offset_y_um : float
        The offset (stage axes) the position's last event was commanded with.
    velocity_px_s : (vx, vy) or None
        The fitted drift velocity of the sample at this position.
    planned_x_um, planned_y_um : float
        The planned coordinates (NaN until the position's first event).
    n_measured : int
        Lock frames measured (reference included).
    n_corrections : int
        Measurements that changed the position's offset.
    alarm : Alarm or None
        The standing alarm of this position.
    alarm_message : str
    """

    key: PositionKey
    name: str | None
    status: LockStatus
    reference: npt.NDArray[Any] | None = field(repr=False)
    last_dx_px: float
    last_dy_px: float
    offset_x_um: float
    offset_y_um: float
    velocity_px_s: tuple[float, float] | None
    planned_x_um: float
    planned_y_um: float
    n_measured: int
    n_corrections: int
    alarm: Alarm | None
    alarm_message: str

    @property
    def position(self) -> int:
        """The MDA position index (``key.p``)."""
        return self.key.p


@dataclass(frozen=True, slots=True)
class PositionMeasurement:
    """What measuring one lock frame produced.

    Attributes
    ----------
    key : PositionKey
    estimate : ShiftEstimate
        The shift against the position's reference.
    reference : bool
        True when the frame became the reference.
    correction : Correction or None
        The decision taken on it (None without feedback, for the reference, or
        when nothing changed and no alarm was raised).
    """

    key: PositionKey
    estimate: ShiftEstimate
    reference: bool
    correction: Correction | None


class VisitVelocity:
    """Drift velocity (px/s) over a position's last visits (Theil–Sen).

    Parameters
    ----------
    max_visits : int
        How many visits are fitted.
    min_visits : int
        Visits (reference included) needed before a velocity exists.
    jump_px : float
        Once a velocity exists, a visit further than this from the prediction
        restarts the history (a bump is a step, not creep).
    max_velocity_px_s : float
        The estimate is clipped to this magnitude.

    Notes
    -----
    Unlike :class:`~stagelock.stage.DriftVelocityEstimator`, which fits the last
    seconds of a video-rate stream, this fits the last *visits*, whatever their
    spacing (an MDA visits a position every few seconds or every few minutes).
    """

    def __init__(
        self,
        *,
        max_visits: int = 8,
        min_visits: int = 3,
        jump_px: float = 3.0,
        max_velocity_px_s: float = 5.0,
    ) -> None:
        self.min_visits = max(2, int(min_visits))
        self.jump_px = float(jump_px)
        self.max_velocity_px_s = float(max_velocity_px_s)
        self._samples: deque[tuple[float, float, float]] = deque(
            maxlen=max(self.min_visits, int(max_visits))
        )
        self.velocity_px_s: tuple[float, float] | None = None
        self.resets = 0

    def predict(self, time_s: float | None = None) -> tuple[float, float] | None:
        """Predict the drift at ``time_s`` (default: the last visit; None if none)."""
        if not self._samples:
            return None
        t0, x0, y0 = self._samples[-1]
        if time_s is None:
            return x0, y0
        vx, vy = self.velocity_px_s or (0.0, 0.0)
        return x0 + vx * (time_s - t0), y0 + vy * (time_s - t0)

    def add(self, time_s: float, drift_x_px: float, drift_y_px: float) -> None:
        """Add one visit's drift; refits the velocity."""
        if self.velocity_px_s is not None:
            pred = self.predict(time_s)
            assert pred is not None
            if math.hypot(drift_x_px - pred[0], drift_y_px - pred[1]) > self.jump_px:
                self._samples.clear()
                self.velocity_px_s = None
                self.resets += 1
        self._samples.append((float(time_s), float(drift_x_px), float(drift_y_px)))
        self.velocity_px_s = self._fit()

    def _fit(self) -> tuple[float, float] | None:
        if len(self._samples) < self.min_visits:
            return None
        data = np.asarray(self._samples)
        i, j = np.triu_indices(len(data), k=1)
        dt = data[j, 0] - data[i, 0]
        keep = dt > 1e-9
        if not keep.any():
            return None
        vx = float(np.median((data[j, 1] - data[i, 1])[keep] / dt[keep]))
        vy = float(np.median((data[j, 2] - data[i, 2])[keep] / dt[keep]))
        speed = math.hypot(vx, vy)
        if speed > self.max_velocity_px_s:
            vx *= self.max_velocity_px_s / speed
            vy *= self.max_velocity_px_s / speed
        return vx, vy


@dataclass(slots=True)
class _Position:
    key: PositionKey
    name: str | None = None
    registrar: Registrar | None = None
    reference_image: Any = None
    planned: tuple[float, float] | None = None
    ref_offset: tuple[float, float] = (0.0, 0.0)
    last_applied: tuple[float, float] = (0.0, 0.0)
    held: tuple[float, float] | None = None  # offset frozen by a refused frame
    velocity: VisitVelocity = field(default_factory=VisitVelocity)
    last_shift: tuple[float, float] = (math.nan, math.nan)
    status: LockStatus = LockStatus.WAITING
    bad_in_row: int = 0
    n_measured: int = 0
    n_corrections: int = 0
    alarm: Alarm | None = None
    alarm_message: str = ""


class PositionLocks:
    """The lock state of every position of an acquisition (thread-safe).

    Parameters
    ----------
    registrar_options : mapping
        Options of each position's :class:`~stagelock.Registrar`.
    calibration : Calibration or None
        Camera→stage transform; None measures only (offsets stay 0).
    feedback : bool
        Compute offsets (needs ``calibration``).
    max_shift_px : float
        A larger measured shift changes nothing (alarm ``large_shift``).
    travel_limit_um : float
        Offsets are clipped to this, per axis, around the planned coordinates.
    feed_forward : bool
        Predict the next visit from the fitted drift velocity.
    dead_band_px : float
        Offset changes smaller than this (as an image shift) are not applied.
    lost_after : int
        Unusable lock frames in a row that mark the lock lost.
    velocity_visits : int
        Visits the velocity is fitted over.
    velocity_min_visits : int
        Visits (reference included) before the velocity is used.
    jump_px : float
        A visit this far from the prediction restarts the velocity history.
    max_velocity_px_s : float
        Cap on the fitted velocity.
    on_alarm : callable(key, alarm, message), optional
        Called when a position raises an alarm (not while it persists).

    Notes
    -----
    State machine of each position (:class:`LockStatus`)::

        WAITING --first lock frame--> OK --unusable frame--> REFUSED
        REFUSED --lost_after in a row--> LOST     REFUSED/LOST --good frame--> OK
    """

    def __init__(
        self,
        registrar_options: Mapping[str, Any] | None = None,
        *,
        calibration: Calibration | None = None,
        feedback: bool = False,
        max_shift_px: float = 20.0,
        travel_limit_um: float = 100.0,
        feed_forward: bool = True,
        dead_band_px: float = 0.0,
        lost_after: int = 2,
        velocity_visits: int = 8,
        velocity_min_visits: int = 3,
        jump_px: float = 3.0,
        max_velocity_px_s: float = 5.0,
        on_alarm: AlarmCallback | None = None,
    ) -> None:
        if feedback and calibration is None:
            raise ValueError("feedback needs a calibration")
        if lost_after < 1:
            raise ValueError(f"lost_after must be >= 1; got {lost_after}")
        self.registrar_options = dict(registrar_options or {})
        self.calibration = calibration
        self.feedback = bool(feedback)
        self.max_shift_px = float(max_shift_px)
        self.travel_limit_um = float(travel_limit_um)
        self.feed_forward = bool(feed_forward)
        self.dead_band_px = float(dead_band_px)
        self.lost_after = int(lost_after)
        self._velocity_args: dict[str, Any] = {
            "max_visits": velocity_visits,
            "min_visits": velocity_min_visits,
            "jump_px": jump_px,
            "max_velocity_px_s": max_velocity_px_s,
        }
        self.on_alarm = on_alarm
        self._lock = threading.Lock()
        self._positions: dict[PositionKey, _Position] = {}

    # -- state ------------------------------------------------------------------

    def _get(self, key: PositionKey, name: str | None = None) -> _Position:
        pos = self._positions.get(key)
        if pos is None:
            pos = _Position(key, velocity=VisitVelocity(**self._velocity_args))
            self._positions[key] = pos
        if name is not None:
            pos.name = name
        return pos

    def snapshot(self) -> dict[PositionKey, PositionState]:
        """Return every position's state, ordered by key."""
        with self._lock:
            return {k: self._state(p) for k, p in sorted(self._positions.items())}

    def registrar(self, key: PositionKey) -> Registrar | None:
        """Return the registrar of ``key``'s reference (None before its first frame)."""
        with self._lock:
            pos = self._positions.get(key)
            return None if pos is None else pos.registrar

    def state(self, key: PositionKey) -> PositionState | None:
        """Return one position's state (None for an unknown position)."""
        with self._lock:
            pos = self._positions.get(key)
            return None if pos is None else self._state(pos)

    @staticmethod
    def _state(p: _Position) -> PositionState:
        planned = p.planned or (math.nan, math.nan)
        return PositionState(
            key=p.key,
            name=p.name,
            status=p.status,
            reference=p.reference_image,
            last_dx_px=p.last_shift[0],
            last_dy_px=p.last_shift[1],
            offset_x_um=p.last_applied[0],
            offset_y_um=p.last_applied[1],
            velocity_px_s=p.velocity.velocity_px_s,
            planned_x_um=planned[0],
            planned_y_um=planned[1],
            n_measured=p.n_measured,
            n_corrections=p.n_corrections,
            alarm=p.alarm,
            alarm_message=p.alarm_message,
        )

    def reset(self, key: PositionKey | None = None) -> None:
        """Forget the reference of one position (or of all).

        The next lock frame becomes the new reference, at its offset.
        """
        with self._lock:
            keys = list(self._positions) if key is None else [key]
            for k in keys:
                pos = self._positions.get(k)
                if pos is None:
                    continue
                pos.registrar = None
                pos.reference_image = None
                pos.status = LockStatus.WAITING
                pos.velocity = VisitVelocity(**self._velocity_args)
                pos.held = None

    # -- the acquisition thread: which offset for the next event ---------------

    def planned(self, key: PositionKey) -> tuple[float, float] | None:
        """Return ``key``'s planned coordinates (None before its first event)."""
        with self._lock:
            pos = self._positions.get(key)
            return None if pos is None else pos.planned

    def offset_for(
        self,
        key: PositionKey,
        time_s: float,
        *,
        planned_um: tuple[float, float],
        name: str | None = None,
    ) -> tuple[float, float]:
        """Return the offset (µm, stage axes) an event at ``key`` starting now carries.

        Cheap (no fitting): called from the engine's ``setup_event``. Records
        ``planned_um`` as the position's planned coordinates at its first event
        and the returned offset as the one last applied there.
        """
        with self._lock:
            pos = self._get(key, name)
            if pos.planned is None:
                pos.planned = (float(planned_um[0]), float(planned_um[1]))
            offset = self._target(pos, time_s)
            pos.last_applied = offset
            return offset

    def _target(self, pos: _Position, time_s: float) -> tuple[float, float]:
        if not self.feedback or self.calibration is None or pos.registrar is None:
            return pos.last_applied
        if pos.held is not None:
            return pos.held
        drift = pos.velocity.predict(time_s if self.feed_forward else None)
        if drift is None:
            return pos.last_applied
        mx, my = self.calibration.px_to_um(-drift[0], -drift[1])
        ox, oy = pos.ref_offset[0] + mx, pos.ref_offset[1] + my
        limit = self.travel_limit_um
        cx = min(max(ox, -limit), limit)
        cy = min(max(oy, -limit), limit)
        if (cx, cy) != (ox, oy) and pos.alarm is not Alarm.TRAVEL_LIMIT:
            msg = (
                f"position {pos.key.label}{_quoted(pos.name)}: offset clipped at "
                f"the travel limit ±{limit:g} µm around its planned coordinates"
            )
            self._raise(pos, Alarm.TRAVEL_LIMIT, msg)
        if self.dead_band_px > 0:
            change = self.calibration.um_to_px(
                cx - pos.last_applied[0], cy - pos.last_applied[1]
            )
            if math.hypot(*change) < self.dead_band_px:
                return pos.last_applied
        return cx, cy

    # -- the worker thread: measure a lock frame --------------------------------

    def measure(
        self,
        key: PositionKey,
        image: npt.NDArray[Any],
        *,
        time_s: float,
        applied_um: tuple[float, float] | None = None,
        frame: int = 0,
        name: str | None = None,
    ) -> PositionMeasurement:
        """Measure one lock frame of ``key`` and update its lock.

        Parameters
        ----------
        key : PositionKey
        image : ndarray
            The frame (2-D; RGB is reduced to luminance by the caller).
        time_s : float
            When its event started (same clock as :meth:`offset_for`).
        applied_um : (x, y), optional
            The offset the frame's event was commanded with (default: the
            position's last applied offset).
        frame : int
            The frame's number (for the correction record).
        name : str, optional
            The position's name.

        Returns
        -------
        PositionMeasurement
        """
        # registration runs outside the table lock: setup_event must never wait
        with self._lock:
            pos = self._get(key, name)
            registrar = pos.registrar
            applied = applied_um if applied_um is not None else pos.last_applied
        if registrar is None or registrar.shape != image.shape:
            registrar = Registrar(image, **self.registrar_options)
            est = ShiftEstimate.at_reference(len(registrar.regions))
            with self._lock:
                pos.registrar = registrar
                pos.reference_image = image
                pos.ref_offset = (float(applied[0]), float(applied[1]))
                pos.velocity = VisitVelocity(**self._velocity_args)
                pos.velocity.add(time_s, 0.0, 0.0)
                pos.last_shift = (0.0, 0.0)
                pos.status = LockStatus.OK
                pos.n_measured += 1
                pos.bad_in_row = 0
                pos.held = None
            return PositionMeasurement(key, est, True, None)
        est = registrar.measure(image)
        with self._lock:
            if pos.registrar is not registrar:  # reset meanwhile
                return PositionMeasurement(key, est, False, None)
            pos.n_measured += 1
            pos.last_shift = (est.dx_px, est.dy_px)
            correction = self._decide(pos, est, time_s, applied, frame)
        return PositionMeasurement(key, est, False, correction)

    def _decide(
        self,
        pos: _Position,
        est: ShiftEstimate,
        time_s: float,
        applied: tuple[float, float],
        frame: int,
    ) -> Correction | None:
        size = math.hypot(est.dx_px, est.dy_px)
        alarm: Alarm | None = None
        if not est.ok:
            alarm = Alarm.LOW_CONFIDENCE
            why = f"status {est.status.value}, confidence {est.confidence:.2f}"
        elif size > self.max_shift_px:
            alarm = Alarm.LARGE_SHIFT
            why = f"shift {size:.1f} px exceeds max_shift_px {self.max_shift_px:g}"
        where = f"position {pos.key.label}{_quoted(pos.name)}"
        if alarm is not None:
            pos.bad_in_row += 1
            pos.held = applied if self.feedback else None
            raised = False
            if pos.bad_in_row >= self.lost_after:
                if pos.status is not LockStatus.LOST:
                    pos.status = LockStatus.LOST
                    held = pos.held or applied
                    self._raise(
                        pos,
                        Alarm.LOCK_LOST,
                        f"{where}: lock lost ({pos.bad_in_row} unusable lock "
                        f"frames in a row, last: {why}); the acquisition continues "
                        f"uncorrected at offset ({held[0]:+.2f}, {held[1]:+.2f}) µm",
                    )
                    raised = True
            else:
                pos.status = LockStatus.REFUSED
                if pos.alarm is not alarm:
                    self._raise(pos, alarm, f"{where}, frame {frame}: {why}; no move")
                    raised = True
            if not raised:
                return None
            return self._record(pos, est, time_s, applied, frame, (0.0, 0.0), True)
        # a good frame: the lock stands again
        if pos.alarm in (Alarm.LOW_CONFIDENCE, Alarm.LARGE_SHIFT, Alarm.LOCK_LOST):
            if pos.alarm is Alarm.LOCK_LOST:
                logger.warning("%s: lock regained", where)
            pos.alarm, pos.alarm_message = None, ""
        pos.bad_in_row = 0
        pos.held = None
        pos.status = LockStatus.OK
        cal = self.calibration
        if cal is None:
            return None
        stage_px = cal.um_to_px(
            applied[0] - pos.ref_offset[0], applied[1] - pos.ref_offset[1]
        )
        pos.velocity.add(time_s, est.dx_px - stage_px[0], est.dy_px - stage_px[1])
        if not self.feedback:
            return None
        target = self._target(pos, time_s)
        move = (target[0] - applied[0], target[1] - applied[1])
        if math.hypot(*move) < 1e-9:
            return None
        pos.n_corrections += 1
        return self._record(pos, est, time_s, applied, frame, move, False)

    def _record(
        self,
        pos: _Position,
        est: ShiftEstimate,
        time_s: float,
        applied: tuple[float, float],
        frame: int,
        move: tuple[float, float],
        refused: bool,
    ) -> Correction:
        planned = pos.planned or (math.nan, math.nan)
        if refused:
            status = CorrectionStatus.REFUSED
        elif pos.alarm is Alarm.TRAVEL_LIMIT:
            status = CorrectionStatus.CLIPPED
        else:
            status = CorrectionStatus.MOVED
        return Correction(
            frame=int(frame),
            time=float(time_s),
            move_x_um=float(move[0]),
            move_y_um=float(move[1]),
            stage_x_um=float(planned[0] + applied[0]),
            stage_y_um=float(planned[1] + applied[1]),
            residual_dx_px=float(est.dx_px),
            residual_dy_px=float(est.dy_px),
            status=status,
            alarm=pos.alarm if status is not CorrectionStatus.MOVED else None,
            message=pos.alarm_message if status is not CorrectionStatus.MOVED else "",
            position=pos.key.p,
            position_name=pos.name,
        )

    def _raise(self, pos: _Position, alarm: Alarm, message: str) -> None:
        pos.alarm, pos.alarm_message = alarm, message
        logger.warning("stage alarm %s: %s", alarm.value, message)
        if self.on_alarm is not None:
            try:
                self.on_alarm(pos.key, alarm, message)
            except Exception:
                logger.exception("on_alarm callback failed")


def _quoted(name: str | None) -> str:
    return f" ({name!r})" if name else ""
