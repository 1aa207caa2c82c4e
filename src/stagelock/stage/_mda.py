"""The locking MDA engine: drift corrections folded into the acquisition's moves.

pymmcore-plus's :class:`~pymmcore_plus.mda.MDAEngine` sets the absolute XY
position of every event (``force_set_xy_position``), so a correction sent to
the stage behind its back is undone at the next event — or, worse, lands while
the acquisition is already at another position. :class:`LockingEngine` does what
the engine already does for autofocus (``_z_correction``, kept per position
index) for XY instead: it adds each position's current offset
(:meth:`~stagelock.stage.PositionLocks.offset_for`, µm in stage axes) to the
event's ``x_pos``/``y_pos`` in :meth:`~LockingEngine.setup_event`, so the
engine's own move carries the correction, and records the offset it commanded in
``event.metadata["stagelock"]`` so the frame is measured against the offset it
was really taken at.

What is measured: per position (``index["p"]``, and ``index["g"]`` for grid
tiles), frames of the *lock channel* (default the sequence's first channel) at
the *lock plane* (default the middle z index). The other channels and planes of
the same position and time point get the same correction (they are taken at the
same corrected XY position) and are never compared with the lock frames or with
each other.

Hardware-sequenced batches (``SequencedEvent``, interval 0): every event of the
batch gets the offset of its first event, set once before the batch; a batch
that sequences the XY stage itself (``x_sequence``) is left uncorrected (logged
once), since its positions are loaded into the stage controller in advance.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pymmcore_plus.core import SequencedEvent
from pymmcore_plus.mda import MDAEngine

from ._positions import PositionKey

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import numpy.typing as npt
    import useq
    from pymmcore_plus import CMMCorePlus
    from pymmcore_plus.metadata import SummaryMetaV1

    from ._positions import PositionLocks

__all__ = [
    "META_KEY",
    "LockSelector",
    "LockingEngine",
    "PendingFrame",
    "SetupTiming",
]

logger = logging.getLogger(__name__)

META_KEY = "stagelock"
"""Key of ``event.metadata`` under which the engine records what it commanded:
``{"offset_x_um", "offset_y_um", "time_s", "lock": bool}``."""


class LockSelector:
    """Which frames of an MDA are lock frames (measured) and which only follow.

    Parameters
    ----------
    lock_channel : str or int, optional
        Channel config name, or channel index ``index["c"]``; default the
        sequence's first channel.
    lock_z : int, optional
        z index ``index["z"]``; default the middle plane of the z plan.
    """

    def __init__(
        self, lock_channel: str | int | None = None, lock_z: int | None = None
    ) -> None:
        self.lock_channel = lock_channel
        self.lock_z = lock_z
        self._channel: str | int | None = lock_channel
        self._z: int | None = lock_z

    def begin(self, sequence: useq.MDASequence) -> None:
        """Resolve the defaults from the sequence about to run."""
        self._channel = self.lock_channel
        if self._channel is None and sequence.channels:
            self._channel = sequence.channels[0].config
        self._z = self.lock_z
        if self._z is None and sequence.z_plan is not None:
            n_z = len(list(sequence.z_plan))
            self._z = n_z // 2 if n_z > 1 else None

    @property
    def channel(self) -> str | int | None:
        """The resolved lock channel (None: every channel)."""
        return self._channel

    @property
    def z(self) -> int | None:
        """The resolved lock plane (None: every plane)."""
        return self._z

    def is_lock(self, event: useq.MDAEvent) -> bool:
        """Return True when ``event``'s frame is measured."""
        index = event.index
        if self._channel is not None and event.channel is not None:
            if isinstance(self._channel, int):
                if index.get("c", 0) != self._channel:
                    return False
            elif event.channel.config != self._channel:
                return False
        return not (self._z is not None and "z" in index and index["z"] != self._z)


@dataclass(frozen=True, slots=True)
class SetupTiming:
    """How long the lock added to the engine's ``setup_event`` (ms).

    Attributes
    ----------
    n_events : int
    mean_ms, median_ms, p95_ms, max_ms : float
        Wall-clock time the lock added (includes being descheduled on a busy
        machine).
    cpu_mean_ms : float
        The same in the acquisition thread's CPU time (what the lock costs).
    """

    n_events: int
    mean_ms: float
    median_ms: float
    p95_ms: float
    max_ms: float
    cpu_mean_ms: float


class LockingEngine(MDAEngine):
    """An :class:`~pymmcore_plus.mda.MDAEngine` that holds each position still.

    Parameters
    ----------
    mmc : CMMCorePlus
        The core.
    locks : PositionLocks
        The per-position lock state (offsets read here, fed by the measuring
        worker).
    selector : LockSelector, optional
        Lock channel and plane.
    clock : callable, optional
        Time source of the drift model (default ``time.time``); the same clock
        must time the measurements.
    **engine_options
        :class:`~pymmcore_plus.mda.MDAEngine` options
        (``use_hardware_sequencing``...).

    Notes
    -----
    The engine never moves the stage itself outside ``setup_event``: the offset
    is part of the move the engine makes anyway. ``_z_correction`` (one-shot
    autofocus) is untouched, so hardware autofocus works as before.
    """

    def __init__(
        self,
        mmc: CMMCorePlus,
        locks: PositionLocks,
        *,
        selector: LockSelector | None = None,
        clock: Callable[[], float] = time.time,
        **engine_options: Any,
    ) -> None:
        super().__init__(mmc, **engine_options)
        self.locks = locks
        self.selector = selector or LockSelector()
        self.clock = clock
        self._added_ms: deque[tuple[float, float]] = deque(maxlen=10_000)
        self._warned_xy_sequence = False
        self._timing_lock = threading.Lock()

    def setup_sequence(self, sequence: useq.MDASequence) -> SummaryMetaV1 | None:
        """Resolve the lock channel/plane, then set the sequence up as usual."""
        self.selector.begin(sequence)
        with self._timing_lock:
            self._added_ms.clear()
        return super().setup_sequence(sequence)

    def setup_event(self, event: useq.MDAEvent) -> None:
        """Set the hardware for ``event`` with its position's offset added."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            corrected = self._corrected(event)
        except Exception:  # never break the acquisition: go uncorrected
            logger.exception("stagelock: could not correct event %s", event.index)
            corrected = event
        added_ms = (time.perf_counter() - t0) * 1000.0
        cpu_ms = (time.thread_time() - c0) * 1000.0
        with self._timing_lock:
            self._added_ms.append((added_ms, cpu_ms))
        super().setup_event(corrected)

    @property
    def timing(self) -> SetupTiming:
        """What the lock added to ``setup_event`` in the current/last sequence."""
        with self._timing_lock:
            data = list(self._added_ms)
        if not data:
            return SetupTiming(0, *([math.nan] * 5))
        wall = np.array([d[0] for d in data])
        cpu = np.array([d[1] for d in data])
        return SetupTiming(
            len(data),
            float(wall.mean()),
            float(np.median(wall)),
            float(np.percentile(wall, 95)),
            float(wall.max()),
            float(cpu.mean()),
        )

    def _corrected(self, event: useq.MDAEvent) -> useq.MDAEvent:
        if isinstance(event, SequencedEvent) and event.x_sequence:
            if not self._warned_xy_sequence:
                logger.warning(
                    "stagelock: a hardware-sequenced XY batch is not corrected "
                    "(its positions are loaded into the stage in advance)"
                )
                self._warned_xy_sequence = True
            return event
        # a hardware-sequenced batch has no index of its own: its first event's
        first = event.events[0] if isinstance(event, SequencedEvent) else event
        key = PositionKey.of_index(first.index)
        planned = self._planned(key, event)
        if planned is None:
            return event
        now = self.clock()
        ox, oy = self.locks.offset_for(
            key, now, planned_um=planned, name=first.pos_name
        )
        record = {
            "offset_x_um": ox,
            "offset_y_um": oy,
            "time_s": now,
            "planned_x_um": planned[0],
            "planned_y_um": planned[1],
        }
        # every frame carries what its event commanded (sequenced: every sub-event)
        for sub in _sub_events(event):
            sub.metadata[META_KEY] = {**record, "lock": self.selector.is_lock(sub)}
        if ox == 0.0 and oy == 0.0 and event.x_pos is not None:
            return event
        return event.model_copy(
            update={"x_pos": planned[0] + ox, "y_pos": planned[1] + oy}
        )

    def _planned(
        self, key: PositionKey, event: useq.MDAEvent
    ) -> tuple[float, float] | None:
        if event.x_pos is not None and event.y_pos is not None:
            return float(event.x_pos), float(event.y_pos)
        known = self.locks.planned(key)
        if known is not None:
            return known
        core = self.mmcore
        if not core.getXYStageDevice():
            return None
        # no planned XY (a time lapse without stage positions): hold the place
        # the stage is at when the position is first visited
        x, y = core.getXYPosition()
        return (
            float(x) if event.x_pos is None else float(event.x_pos),
            float(y) if event.y_pos is None else float(event.y_pos),
        )


def _sub_events(event: useq.MDAEvent) -> Iterator[useq.MDAEvent]:
    yield event
    if isinstance(event, SequencedEvent):
        yield from event.events


@dataclass(frozen=True, slots=True)
class PendingFrame:
    """A lock frame waiting to be measured.

    Attributes
    ----------
    key : PositionKey
    image : ndarray
    frame_index : int
    time_s : float
        When its event started (the engine's clock), or when it arrived.
    applied_um : (x, y) or None
        The offset its event was commanded with (None: unknown, no engine).
    name : str or None
    index : dict
        The event's index.
    channel : str or None
    arrived_s : float
        Wall-clock arrival time (``time.time()``).
    """

    key: PositionKey
    image: npt.NDArray[Any]
    frame_index: int
    time_s: float
    applied_um: tuple[float, float] | None
    name: str | None
    index: dict[str, int]
    channel: str | None
    arrived_s: float
