"""Measure drift — and hold it — inside a process that already runs pymmcore-plus.

For scripts and napari-micromanager: :func:`attach` listens to the core's frames
(MDA ``frameReady`` and ``imageSnapped``), measures them on a worker thread and
never slows the acquisition down. Every MDA position (``index["p"]``, grid tile
``index["g"]``) has its own reference; snapped images and MDAs without stage
positions count as position 0. In an MDA only the *lock frames* are measured:
the lock channel (default the sequence's first) at the lock plane (default the
middle z index); the other channels and planes follow the position's correction.

With ``feedback=True`` the handle installs a
:class:`~stagelock.stage.LockingEngine` for the duration of the context: each
event's own stage move carries its position's correction (the stage is never
moved behind the engine's back), and the original engine is put back on exit.

Size: over 600 lines because the single-field and the per-position (MDA) lock
share one handle, its worker and its life cycle.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stagelock.registration import ShiftEstimate, Status

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    import numpy.typing as npt
    from pymmcore_plus import CMMCorePlus
    from pymmcore_plus.mda import PMDAEngine

    from stagelock.config import StageSettings
    from stagelock.registration import Registrar
    from stagelock.stage import (
        Alarm,
        Calibration,
        Correction,
        PositionKey,
        PositionState,
    )
    from stagelock.stage._mda import LockingEngine, LockSelector, PendingFrame

__all__ = ["AttachHandle", "FrameShift", "attach"]

logger = logging.getLogger(__name__)

ShiftCallback = Callable[[int, ShiftEstimate], None]
CorrectionCallback = Callable[["Correction"], None]
AlarmCallback = Callable[["PositionKey", "Alarm", str], None]


@dataclass(frozen=True, slots=True)
class FrameShift:
    """One measured frame.

    Attributes
    ----------
    frame_index : int
        Count of frames the handle received before this one (from 0).
    time_s : float
        Unix time at which the frame arrived.
    estimate : ShiftEstimate
        The displacement of the frame relative to its position's reference.
    mda_index : mapping
        The MDA event's index (``{"t": 3, "p": 1}``), empty for snapped images.
    position : int
        The MDA position index (0 for snapped images).
    position_name : str or None
        The position's ``pos_name``.
    channel : str or None
        The channel config of the frame's event.
    z : int or None
        The z index of the frame's event.
    offset_x_um, offset_y_um : float
        The correction the frame's event was commanded with (0 without feedback).
    """

    frame_index: int
    time_s: float
    estimate: ShiftEstimate
    mda_index: Mapping[str, int]
    position: int = 0
    position_name: str | None = None
    channel: str | None = None
    z: int | None = None
    offset_x_um: float = 0.0
    offset_y_um: float = 0.0

    @property
    def dx_px(self) -> float:
        """Alias of ``estimate.dx_px``."""
        return self.estimate.dx_px

    @property
    def dy_px(self) -> float:
        """Alias of ``estimate.dy_px``."""
        return self.estimate.dy_px

    @property
    def status(self) -> Status:
        """Alias of ``estimate.status``."""
        return self.estimate.status


class AttachHandle:
    """A live connection between a core and a per-position drift lock.

    Created by :func:`attach`. State machine::

        attached --detach()--> detached   (also on leaving a ``with`` block)

    Lock frames arrive on the acquisition's thread and are put into a
    :class:`~stagelock.daemon.KeyedLatestSlot` (at most one waiting frame per
    position: a frame never replaces another position's); the worker measures
    them in arrival order. Frames replaced by a newer one of the same position
    are counted in :attr:`skipped`; frames of other channels/planes in
    :attr:`followers`. :meth:`detach` measures what is still waiting, so
    ``received == measured + skipped + followers`` (+ failures) afterwards.

    Attributes
    ----------
    core : CMMCorePlus
        The core being watched.
    locks : PositionLocks
        The per-position state (see :attr:`positions`).
    engine : LockingEngine or None
        The engine installed while attached (feedback only).
    received : int
        Frames received so far.
    followers : int
        MDA frames that were not lock frames (other channels or planes).
    """

    def __init__(
        self,
        core: CMMCorePlus,
        registrar_options: Mapping[str, Any],
        *,
        on_shift: ShiftCallback | None = None,
        max_estimates: int = 10_000,
        feedback: bool = False,
        calibration: Calibration | None = None,
        lock_channel: str | int | None = None,
        lock_z: int | None = None,
        stage: StageSettings | None = None,
        lost_after: int = 2,
        clock: Callable[[], float] = time.time,
        on_correction: CorrectionCallback | None = None,
        on_alarm: AlarmCallback | None = None,
    ) -> None:
        from stagelock.config import StageSettings
        from stagelock.daemon import KeyedLatestSlot
        from stagelock.stage import PositionLocks
        from stagelock.stage._mda import LockSelector

        self.core = core
        self._on_shift = on_shift
        self._on_correction = on_correction
        self._clock = clock
        s = stage if stage is not None else StageSettings(feedback=feedback)
        self.locks = PositionLocks(
            registrar_options,
            calibration=calibration,
            feedback=feedback,
            max_shift_px=s.max_shift_px,
            travel_limit_um=s.travel_limit_um,
            feed_forward=s.feed_forward,
            dead_band_px=0.0,
            lost_after=lost_after,
            jump_px=max(s.jump_px, 3.0),
            max_velocity_px_s=s.max_velocity_px_s,
            on_alarm=on_alarm,
        )
        self.selector: LockSelector = LockSelector(lock_channel, lock_z)
        self._estimates: collections.deque[FrameShift] = collections.deque(
            maxlen=max_estimates
        )
        self._corrections: collections.deque[Correction] = collections.deque(
            maxlen=max_estimates
        )
        # one waiting frame per position: a frame never replaces another position's
        self._slot: KeyedLatestSlot[PendingFrame] = KeyedLatestSlot(
            lambda pending: pending.key
        )
        self._cond = threading.Condition()
        self._closed = False
        self.received = 0
        self.measured = 0
        self.followers = 0
        self._failures = 0
        self.engine: LockingEngine | None = None
        self._old_engine: PMDAEngine | None = None
        if feedback:
            self._install_engine()
        else:
            core.mda.events.sequenceStarted.connect(self._on_sequence)
        self._worker = threading.Thread(
            target=self._run, name="stagelock-attach", daemon=True
        )
        self._worker.start()
        core.mda.events.frameReady.connect(self._on_mda_frame)
        core.events.imageSnapped.connect(self._on_snapped)

    def _install_engine(self) -> None:
        from pymmcore_plus.mda import MDAEngine

        from stagelock.stage._mda import LockingEngine

        old = self.core.mda.engine
        options: dict[str, Any] = {}
        if isinstance(old, MDAEngine):
            # keep the user's engine settings (hardware sequencing, restore...)
            options = {
                "use_hardware_sequencing": old.use_hardware_sequencing,
                "force_set_xy_position": old.force_set_xy_position,
                "restore_initial_state": old.restore_initial_state,
            }
        engine = LockingEngine(
            self.core, self.locks, selector=self.selector, clock=self._clock, **options
        )
        self._old_engine = self.core.mda.set_engine(engine)
        self.engine = engine

    # -- results ------------------------------------------------------------------

    @property
    def skipped(self) -> int:
        """Lock frames replaced by a newer one of the same position, unmeasured."""
        return self._slot.skipped_total

    @property
    def latest(self) -> FrameShift | None:
        """The most recent measurement, or None before the first."""
        with self._cond:
            return self._estimates[-1] if self._estimates else None

    @property
    def estimates(self) -> list[FrameShift]:
        """The kept measurements, oldest first (bounded by ``max_estimates``)."""
        with self._cond:
            return list(self._estimates)

    @property
    def corrections(self) -> list[Correction]:
        """Offset changes and refusals decided so far (feedback only)."""
        with self._cond:
            return list(self._corrections)

    @property
    def positions(self) -> dict[PositionKey, PositionState]:
        """Every position's lock state (reference, last shift, offset, velocity)."""
        return self.locks.snapshot()

    @property
    def reference(self) -> Registrar | None:
        """The registrar of position 0's reference (None before its first frame)."""
        from stagelock.stage import PositionKey

        return self.locks.registrar(PositionKey())

    @property
    def detached(self) -> bool:
        """True once :meth:`detach` was called."""
        return self._closed

    def wait_for(self, n_measured: int, timeout_s: float = 10.0) -> bool:
        """Wait until at least ``n_measured`` frames were measured.

        Returns
        -------
        bool
            True when reached, False on timeout.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.measured < n_measured:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until every frame received so far was measured (or skipped).

        Returns
        -------
        bool
            True when idle, False on timeout.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.received > self.measured + self.skipped + self.followers + (
                self._failures
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def reset_reference(self) -> None:
        """Make the next lock frame of every position its new reference."""
        self.locks.reset()

    # -- lifecycle -----------------------------------------------------------------

    def detach(self, timeout_s: float = 5.0) -> None:
        """Disconnect from the core, put the original engine back, stop the worker.

        Idempotent. After it returns, the callbacks are not called again.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
        for signal, slot in (
            (self.core.mda.events.frameReady, self._on_mda_frame),
            (self.core.events.imageSnapped, self._on_snapped),
            (self.core.mda.events.sequenceStarted, self._on_sequence),
        ):
            with contextlib.suppress(Exception):
                signal.disconnect(slot)
        self._restore_engine(timeout_s)
        # the worker measures the frames still waiting, then stops
        self._slot.close()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout_s)

    def _restore_engine(self, timeout_s: float) -> None:
        if self.engine is None or self._old_engine is None:
            return
        deadline = time.monotonic() + timeout_s
        while self.core.mda.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)  # an MDA in another thread: let it finish first
        try:
            self.core.mda.set_engine(self._old_engine)
        except Exception:
            logger.exception(
                "attach: could not put the original MDA engine back (an MDA is "
                "still running?)"
            )

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    # -- producer side (acquisition threads) -------------------------------------------

    def _take_index(self) -> int | None:
        with self._cond:
            if self._closed:
                return None
            index = self.received
            self.received += 1
            return index

    def _on_sequence(self, sequence: Any, *args: Any) -> None:
        try:
            self.selector.begin(sequence)
        except Exception:  # pragma: no cover - never break the acquisition
            logger.exception("attach: could not read the sequence")

    def _on_mda_frame(self, image: npt.NDArray[Any], event: Any, meta: Any) -> None:
        try:
            self._offer_event(image, event)
        except Exception:  # pragma: no cover - never break the acquisition
            logger.exception("attach: could not take an MDA frame")

    def _offer_event(self, image: npt.NDArray[Any], event: Any) -> None:
        from stagelock.stage import PositionKey
        from stagelock.stage._mda import META_KEY, PendingFrame

        frame_index = self._take_index()
        if frame_index is None:
            return
        record = event.metadata.get(META_KEY)
        lock = record["lock"] if record else self.selector.is_lock(event)
        if not lock:
            with self._cond:
                self.followers += 1
                self._cond.notify_all()
            return
        index = dict(event.index)
        self._slot.put(
            PendingFrame(
                key=PositionKey.of_index(index),
                image=image,
                frame_index=frame_index,
                time_s=record["time_s"] if record else self._clock(),
                applied_um=(
                    (record["offset_x_um"], record["offset_y_um"]) if record else None
                ),
                name=event.pos_name,
                index=index,
                channel=None if event.channel is None else event.channel.config,
                arrived_s=time.time(),
            )
        )

    def _on_snapped(self, *args: Any) -> None:
        try:
            # an MDA snaps too, and its frame arrives again through frameReady
            if self.core.mda.is_running():
                return
            from stagelock.stage import PositionKey
            from stagelock.stage._mda import PendingFrame

            frame_index = self._take_index()
            if frame_index is None:
                return
            self._slot.put(
                PendingFrame(
                    key=PositionKey(),
                    image=self.core.getImage(),
                    frame_index=frame_index,
                    time_s=self._clock(),
                    applied_um=None,
                    name=None,
                    index={},
                    channel=None,
                    arrived_s=time.time(),
                )
            )
        except Exception:  # pragma: no cover - never break the acquisition
            logger.exception("attach: could not take a snapped image")

    # -- consumer side (worker thread) ----------------------------------------------

    def _run(self) -> None:
        from stagelock.daemon import SlotClosed

        while True:
            try:
                got = self._slot.get()
            except SlotClosed:
                return
            if got is not None:
                self._measure_one(got[0])

    def _measure_one(self, pending: PendingFrame) -> None:
        try:
            frame = np.asarray(pending.image)
            if frame.ndim == 3 and frame.shape[-1] in (3, 4):
                frame = frame[..., :3].mean(axis=-1)  # RGB cameras: luminance
            result = self.locks.measure(
                pending.key,
                frame,
                time_s=pending.time_s,
                applied_um=pending.applied_um,
                frame=pending.frame_index,
                name=pending.name,
            )
        except Exception:
            logger.exception("attach: measuring frame %d failed", pending.frame_index)
            with self._cond:
                self._failures += 1
                self._cond.notify_all()
            return
        applied = pending.applied_um or (0.0, 0.0)
        shift = FrameShift(
            pending.frame_index,
            pending.arrived_s,
            result.estimate,
            pending.index,
            position=pending.key.p,
            position_name=pending.name,
            channel=pending.channel,
            z=pending.index.get("z"),
            offset_x_um=applied[0],
            offset_y_um=applied[1],
        )
        with self._cond:
            self._estimates.append(shift)
            if result.correction is not None:
                self._corrections.append(result.correction)
            self.measured += 1
            self._cond.notify_all()
        if self._on_shift is not None:
            try:
                self._on_shift(pending.frame_index, result.estimate)
            except Exception:
                logger.exception("attach: on_shift callback raised")
        if result.correction is not None and self._on_correction is not None:
            try:
                self._on_correction(result.correction)
            except Exception:
                logger.exception("attach: on_correction callback raised")


def attach(
    core: CMMCorePlus,
    config: Mapping[str, Any] | None = None,
    *,
    feedback: bool = False,
    calibration: Calibration | str | Path | None = None,
    lock_channel: str | int | None = None,
    lock_z: int | None = None,
    stage: StageSettings | Mapping[str, Any] | None = None,
    lost_after: int = 2,
    clock: Callable[[], float] = time.time,
    on_shift: ShiftCallback | None = None,
    on_correction: CorrectionCallback | None = None,
    on_alarm: AlarmCallback | None = None,
    max_estimates: int = 10_000,
    **registrar_options: Any,
) -> AttachHandle:
    """Measure (and with ``feedback`` hold) the drift of every position a core images.

    Listens to ``core.mda.events.frameReady`` and ``core.events.imageSnapped``;
    each position's first lock frame becomes its reference, later ones are
    measured against it on a worker thread. Acquisition threads only hand frames
    over, so measuring never slows the acquisition.

    Parameters
    ----------
    core : CMMCorePlus
        The core (``CMMCorePlus`` or ``UniMMCore``) that acquires.
    config : mapping, optional
        Registrar options (see :class:`stagelock.Registrar`), e.g.
        ``{"max_shift_px": 30}``; keyword arguments override it.
    feedback : bool
        Install a :class:`~stagelock.stage.LockingEngine` on ``core.mda`` for
        the context: every event's XY move carries its position's correction
        (with the drift velocity's prediction for the visit). The original
        engine is restored by :meth:`AttachHandle.detach`, also after an
        exception inside the ``with`` block.
    calibration : Calibration or path, optional
        Camera→stage transform, or a file from ``stagelock calibrate``. None
        (with feedback): measured now at the current stage position
        (:func:`stagelock.stage.calibrate`, which refuses bad fits).
    lock_channel : str or int, optional
        Channel measured (config name or index); default the sequence's first.
    lock_z : int, optional
        z index measured; default the middle plane.
    stage : StageSettings or mapping, optional
        ``max_shift_px``, ``travel_limit_um`` (per position, around its planned
        coordinates), ``feed_forward``, ``max_velocity_px_s`` and the
        ``calibration`` settings.
    lost_after : int
        Unusable lock frames in a row at a position that raise ``lock_lost``.
    clock : callable
        Time source of the drift model (default ``time.time``).
    on_shift : callable(frame_index, ShiftEstimate), optional
        Called on the worker thread after each measurement (keep it short).
    on_correction : callable(Correction), optional
        Called on the worker thread when a position's offset changes or a
        correction is refused.
    on_alarm : callable(PositionKey, Alarm, str), optional
        Called when a position raises an alarm.
    max_estimates : int
        How many measurements :attr:`AttachHandle.estimates` keeps.
    **registrar_options
        More registrar options.

    Returns
    -------
    AttachHandle
        ``handle.positions``, ``handle.latest``, ``handle.estimates``,
        ``handle.corrections``; ``handle.detach()`` (or a ``with`` block)
        disconnects.

    Raises
    ------
    TypeError
        On an option :class:`~stagelock.Registrar` does not accept.
    stagelock.stage.CalibrationError
        When the calibration measured at start is not trustworthy.

    Examples
    --------
    >>> with attach(core, feedback=True, max_shift_px=30) as lock:  # doctest: +SKIP
    ...     core.mda.run(sequence)
    ...     print(lock.positions)
    """
    from stagelock.config import StageSettings
    from stagelock.stage import Calibration

    options: dict[str, Any] = dict(config or {})
    options.update(registrar_options)
    _check_options(options)
    if max_estimates < 1:
        raise ValueError(f"max_estimates must be >= 1; got {max_estimates}")
    if isinstance(stage, StageSettings):
        settings = stage
    else:
        settings = StageSettings.model_validate({"feedback": feedback, **(stage or {})})
    cal: Calibration | None = None
    if isinstance(calibration, Calibration):
        cal = calibration
    elif calibration is not None:
        cal = Calibration.from_file(calibration)
    elif feedback:
        from stagelock.stage import calibrate

        # before any signal is connected: the calibration's snaps are not frames
        cal = calibrate(
            core, device=settings.device, **settings.calibration.model_dump()
        )
        logger.info(
            "attach: calibrated at the current position: %.4f µm/px, rotation "
            "%+.2f°, flip %s, residual %.3f px",
            cal.pixel_size_um,
            cal.rotation_deg,
            "yes" if cal.flipped else "no",
            cal.residual_px,
        )
    return AttachHandle(
        core,
        options,
        on_shift=on_shift,
        max_estimates=max_estimates,
        feedback=feedback,
        calibration=cal,
        lock_channel=lock_channel,
        lock_z=lock_z,
        stage=settings,
        lost_after=lost_after,
        clock=clock,
        on_correction=on_correction,
        on_alarm=on_alarm,
    )


def _check_options(options: Mapping[str, Any]) -> None:
    import inspect

    from stagelock.registration import Registrar

    allowed = set(inspect.signature(Registrar).parameters) - {"reference"}
    for key in options:
        if key not in allowed:
            raise TypeError(
                f"unknown registrar option {key!r}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
