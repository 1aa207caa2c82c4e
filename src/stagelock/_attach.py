"""Measure drift inside a process that already runs pymmcore-plus.

For scripts and napari-micromanager: :func:`attach` listens to the core's frames
(MDA ``frameReady`` and ``imageSnapped``), measures them on a worker thread and
never slows the acquisition down.
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

from stagelock.daemon import LatestSlot, SlotClosed
from stagelock.registration import Registrar, ShiftEstimate, Status

if TYPE_CHECKING:
    from types import TracebackType

    import numpy.typing as npt
    from pymmcore_plus import CMMCorePlus

__all__ = ["AttachHandle", "FrameShift", "attach"]

logger = logging.getLogger(__name__)

ShiftCallback = Callable[[int, ShiftEstimate], None]


@dataclass(frozen=True, slots=True)
class FrameShift:
    """One measured frame.

    Attributes
    ----------
    frame_index : int
        Count of frames the handle received before this one (from 0; frame 0
        is the reference).
    time_s : float
        Unix time at which the frame arrived.
    estimate : ShiftEstimate
        The measured displacement of the frame relative to the reference.
    mda_index : mapping
        The MDA event's index (``{"t": 3, "p": 1}``), empty for snapped images.
    """

    frame_index: int
    time_s: float
    estimate: ShiftEstimate
    mda_index: Mapping[str, int]

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


@dataclass(frozen=True, slots=True)
class _Pending:
    image: npt.NDArray[Any]
    frame_index: int
    time_s: float
    mda_index: Mapping[str, int]


class AttachHandle:
    """A live connection between a core and a drift measurement.

    Created by :func:`attach`. State machine::

        attached --detach()--> detached   (also on leaving a ``with`` block)

    Frames arrive on the acquisition's thread and are put into the daemon's
    latest-wins slot (:class:`~stagelock.daemon.LatestSlot`); the worker
    measures the newest one. Frames replaced before the worker got to them are
    counted in :attr:`skipped` and not measured. :meth:`detach` measures the
    frame still waiting in the slot, so ``received == measured + skipped``
    (+ failures) afterwards.

    Attributes
    ----------
    core : CMMCorePlus
        The core being watched.
    received : int
        Frames received so far.
    """

    def __init__(
        self,
        core: CMMCorePlus,
        registrar_options: Mapping[str, Any],
        *,
        on_shift: ShiftCallback | None = None,
        max_estimates: int = 10_000,
    ) -> None:
        self.core = core
        self._options = dict(registrar_options)
        self._on_shift = on_shift
        self._registrar: Registrar | None = None
        self._estimates: collections.deque[FrameShift] = collections.deque(
            maxlen=max_estimates
        )
        self._slot: LatestSlot[_Pending] = LatestSlot()
        self._cond = threading.Condition()
        self._closed = False
        self.received = 0
        self.measured = 0
        self._worker = threading.Thread(
            target=self._run, name="stagelock-attach", daemon=True
        )
        self._worker.start()
        core.mda.events.frameReady.connect(self._on_mda_frame)
        core.events.imageSnapped.connect(self._on_snapped)

    # -- results ------------------------------------------------------------------

    @property
    def skipped(self) -> int:
        """Frames dropped because the worker was still busy with an earlier one."""
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
    def reference(self) -> Registrar | None:
        """The registrar holding the reference (None before the first frame)."""
        return self._registrar

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

    def reset_reference(self) -> None:
        """Make the next frame the new reference."""
        with self._cond:
            self._registrar = None

    # -- lifecycle -----------------------------------------------------------------

    def detach(self, timeout_s: float = 5.0) -> None:
        """Disconnect from the core and stop the worker; idempotent.

        After it returns, ``on_shift`` is not called again.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            self.core.mda.events.frameReady.disconnect(self._on_mda_frame)
        with contextlib.suppress(Exception):
            self.core.events.imageSnapped.disconnect(self._on_snapped)
        # the worker measures the frame still in the slot, then stops
        self._slot.close()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout_s)

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

    def _offer(self, image: npt.NDArray[Any], mda_index: Mapping[str, int]) -> None:
        with self._cond:
            if self._closed:
                return
            index = self.received
            self.received += 1
        self._slot.put(_Pending(image, index, time.time(), mda_index))

    def _on_mda_frame(self, image: npt.NDArray[Any], event: Any, meta: Any) -> None:
        try:
            self._offer(image, dict(event.index))
        except Exception:  # pragma: no cover - never break the acquisition
            logger.exception("attach: could not take an MDA frame")

    def _on_snapped(self, *args: Any) -> None:
        try:
            # an MDA snaps too, and its frame arrives again through frameReady
            if self.core.mda.is_running():
                return
            self._offer(self.core.getImage(), {})
        except Exception:  # pragma: no cover - never break the acquisition
            logger.exception("attach: could not take a snapped image")

    # -- consumer side (worker thread) ----------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                got = self._slot.get()
            except SlotClosed:
                return
            if got is None:
                continue
            pending = got[0]
            try:
                estimate = self._measure(pending.image)
            except Exception:
                logger.exception(
                    "attach: measuring frame %d failed", pending.frame_index
                )
                continue
            result = FrameShift(
                pending.frame_index, pending.time_s, estimate, pending.mda_index
            )
            with self._cond:
                self._estimates.append(result)
                self.measured += 1
                self._cond.notify_all()
            if self._on_shift is not None:
                try:
                    self._on_shift(pending.frame_index, estimate)
                except Exception:
                    logger.exception("attach: on_shift callback raised")

    def _measure(self, image: npt.NDArray[Any]) -> ShiftEstimate:
        frame = np.asarray(image)
        if frame.ndim == 3 and frame.shape[-1] in (3, 4):
            frame = frame[..., :3].mean(axis=-1)  # RGB cameras: measure luminance
        registrar = self._registrar
        if registrar is None or registrar.shape != frame.shape:
            registrar = Registrar(frame, **self._options)
            self._registrar = registrar
            return ShiftEstimate(0.0, 0.0, 1.0, Status.OK, registrar.n_regions, 0.0)
        return registrar.measure(frame)


def attach(
    core: CMMCorePlus,
    config: Mapping[str, Any] | None = None,
    *,
    on_shift: ShiftCallback | None = None,
    max_estimates: int = 10_000,
    **registrar_options: Any,
) -> AttachHandle:
    """Measure the drift of every frame a pymmcore-plus core acquires.

    Listens to ``core.mda.events.frameReady`` and ``core.events.imageSnapped``;
    the first frame becomes the reference, later frames are measured against it on
    a worker thread. Acquisition threads only hand frames over (latest wins), so
    measuring never slows the acquisition.

    Parameters
    ----------
    core : CMMCorePlus
        The core (``CMMCorePlus`` or ``UniMMCore``) that acquires.
    config : mapping, optional
        Registrar options (see :class:`stagelock.Registrar`), e.g.
        ``{"max_shift_px": 30}``; keyword arguments override it.
    on_shift : callable(frame_index, ShiftEstimate), optional
        Called on the worker thread after each measurement (keep it short).
    max_estimates : int
        How many measurements :attr:`AttachHandle.estimates` keeps.
    **registrar_options
        More registrar options.

    Returns
    -------
    AttachHandle
        Use ``handle.latest``, ``handle.estimates``, ``handle.skipped``;
        ``handle.detach()`` (or a ``with`` block) disconnects.

    Raises
    ------
    TypeError
        On an option :class:`~stagelock.Registrar` does not accept.

    Examples
    --------
    >>> with attach(core, max_shift_px=30) as lock:  # doctest: +SKIP
    ...     core.mda.run(sequence)
    ...     print(lock.latest.dx_px, lock.latest.dy_px)
    """
    options: dict[str, Any] = dict(config or {})
    options.update(registrar_options)
    _check_options(options)
    if max_estimates < 1:
        raise ValueError(f"max_estimates must be >= 1; got {max_estimates}")
    return AttachHandle(core, options, on_shift=on_shift, max_estimates=max_estimates)


def _check_options(options: Mapping[str, Any]) -> None:
    import inspect

    allowed = set(inspect.signature(Registrar).parameters) - {"reference"}
    for key in options:
        if key not in allowed:
            raise TypeError(
                f"unknown registrar option {key!r}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
