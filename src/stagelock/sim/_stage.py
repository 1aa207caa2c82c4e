"""The one simulated XY-stage model: speed, settle time, quantisation, backlash.

Used by the simulated microscope's Python XY stage (real time) and by
:class:`~stagelock.sim.PlantStage` (simulated time), so both move alike.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from stagelock.config import SimulationSettings

__all__ = ["StageMechanics"]


@dataclass(frozen=True, slots=True)
class _Move:
    """One straight stage move between physical (sample) positions."""

    start: tuple[float, float]
    end: tuple[float, float]
    motor_start: tuple[float, float]
    motor_end: tuple[float, float]
    t_start: float
    t_end: float


class StageMechanics:
    """Stage kinematics: speed, settle, quantisation, backlash (monotonic time).

    ``motor`` is where the controller thinks it is (what ``getXYPosition``
    reports, before the user origin); ``sample`` is where the stage really moved
    the sample, lagging by the backlash after a reversal.
    """

    def __init__(
        self,
        *,
        speed_um_per_s: float,
        settle_s: float,
        step_um: float = 0.0,
        backlash_um: float = 0.0,
        limits_um: tuple[float, float, float, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.speed = float(speed_um_per_s)
        self.settle_s = float(settle_s)
        self.step = float(step_um)
        self.backlash = float(backlash_um)
        self.limits = limits_um
        self.clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._move = _Move((0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), now, now)
        self._settled_at = now

    @classmethod
    def from_settings(
        cls, settings: SimulationSettings, clock: Callable[[], float] = time.monotonic
    ) -> StageMechanics:
        """Build the stage the simulated microscope's settings describe."""
        return cls(
            speed_um_per_s=settings.stage_speed_um_per_s,
            settle_s=settings.stage_settle_ms / 1000.0,
            step_um=settings.stage_step_um,
            backlash_um=settings.backlash_um,
            limits_um=settings.travel_range_um,
            clock=clock,
        )

    def settled_at(self) -> float:
        """Clock time at which the current move has settled."""
        with self._lock:
            return self._settled_at

    def quantise(self, value: float) -> float:
        """Round a target to the stage's resolution."""
        if self.step <= 0:
            return value
        return round(value / self.step) * self.step

    @staticmethod
    def _interp(
        a: tuple[float, float], b: tuple[float, float], frac: float
    ) -> tuple[float, float]:
        return (a[0] + (b[0] - a[0]) * frac, a[1] + (b[1] - a[1]) * frac)

    def _frac(self, move: _Move, now: float) -> float:
        if move.t_end <= move.t_start or now >= move.t_end:
            return 1.0
        return max(0.0, (now - move.t_start) / (move.t_end - move.t_start))

    def positions(self, now: float | None = None) -> tuple[tuple[float, float], ...]:
        """(motor, sample) positions at ``now``."""
        now = self.clock() if now is None else now
        with self._lock:
            move = self._move
        frac = self._frac(move, now)
        motor = self._interp(move.motor_start, move.motor_end, frac)
        sample = self._interp(move.start, move.end, frac)
        return motor, sample

    def move_to(self, x_um: float, y_um: float) -> None:
        """Start a move of the motor to (x, y); returns immediately."""
        target = (self.quantise(float(x_um)), self.quantise(float(y_um)))
        if self.limits is not None:
            xmin, xmax, ymin, ymax = self.limits
            if not (xmin <= target[0] <= xmax and ymin <= target[1] <= ymax):
                raise ValueError(
                    f"XY target ({target[0]:.3f}, {target[1]:.3f}) µm is outside the "
                    f"travel range x {xmin}..{xmax}, y {ymin}..{ymax} µm"
                )
        now = self.clock()
        motor, sample = self.positions(now)
        # backlash as a play operator: the sample follows the motor only once
        # the motor has taken up the play on that axis
        half = self.backlash / 2.0
        end = tuple(
            min(max(s, t - half), t + half) for s, t in zip(sample, target, strict=True)
        )
        distance = math.hypot(target[0] - motor[0], target[1] - motor[1])
        duration = distance / self.speed
        with self._lock:
            self._move = _Move(
                sample, (end[0], end[1]), motor, target, now, now + duration
            )
            self._settled_at = now + duration + (self.settle_s if distance > 0 else 0.0)

    def stop(self) -> None:
        """Halt where the stage is now."""
        now = self.clock()
        motor, sample = self.positions(now)
        with self._lock:
            self._move = _Move(sample, sample, motor, motor, now, now)
            self._settled_at = now

    def busy(self) -> bool:
        """Return True while moving or settling."""
        with self._lock:
            return self.clock() < self._settled_at
