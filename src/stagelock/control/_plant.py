"""A simulated-time XY stage plant for controller tests and benchmarks.

Unlike the simulated microscope (real time), everything here runs on a
:class:`SimClock` that only advances when told, so hundreds of control cycles with
realistic stage delay, settle time, quantisation and backlash take milliseconds.
"""

from __future__ import annotations

import math

__all__ = ["PlantStage", "SimClock"]


class SimClock:
    """A clock that advances only through :meth:`sleep`/:meth:`advance`."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = float(start_s)

    def __call__(self) -> float:
        """Return the current simulated time (s)."""
        return self.now_s

    def sleep(self, seconds: float) -> None:
        """Advance the clock by ``seconds``."""
        self.now_s += max(0.0, float(seconds))

    advance = sleep


class PlantStage:
    """A :class:`StageDriver` with speed, settle time, quantisation and backlash.

    Parameters
    ----------
    clock : SimClock
        Simulated time.
    speed_um_s : float
        Vector travel speed.
    settle_s : float
        Busy time after arrival.
    step_um : float
        Motor resolution (targets rounded to it); 0 = exact.
    backlash_um : float
        Play per axis: the carriage (sample) lags the motor by up to half of it.
    fail_after : int, optional
        Raise ``OSError`` on every move after this many (stage-error tests).
    """

    def __init__(
        self,
        clock: SimClock,
        *,
        speed_um_s: float = 200.0,
        settle_s: float = 0.03,
        step_um: float = 0.0,
        backlash_um: float = 0.0,
        fail_after: int | None = None,
    ) -> None:
        self.clock = clock
        self.speed_um_s = float(speed_um_s)
        self.settle_s = float(settle_s)
        self.step_um = float(step_um)
        self.backlash_um = float(backlash_um)
        self.fail_after = fail_after
        self.n_moves = 0
        self._motor0 = (0.0, 0.0)
        self._motor1 = (0.0, 0.0)
        self._load0 = (0.0, 0.0)
        self._load1 = (0.0, 0.0)
        self._t0 = self._t1 = self._settled = clock()

    def _q(self, v: float) -> float:
        return round(v / self.step_um) * self.step_um if self.step_um > 0 else v

    def _frac(self, t: float) -> float:
        if t >= self._t1 or self._t1 <= self._t0:
            return 1.0
        return max(0.0, (t - self._t0) / (self._t1 - self._t0))

    def motor_um(self, t: float | None = None) -> tuple[float, float]:
        """Motor position at ``t`` (default now)."""
        f = self._frac(self.clock() if t is None else t)
        a, b = self._motor0, self._motor1
        return a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f

    def sample_position_um(self, t: float | None = None) -> tuple[float, float]:
        """Where the carriage really is (lags the motor after reversals)."""
        f = self._frac(self.clock() if t is None else t)
        a, b = self._load0, self._load1
        return a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f

    def get_position_um(self) -> tuple[float, float]:
        """Return the motor position (what the controller reports)."""
        x, y = self.motor_um()
        return self._q(x), self._q(y)

    def move_relative_um(self, dx_um: float, dy_um: float) -> None:
        """Start a relative move; returns at once."""
        if self.fail_after is not None and self.n_moves >= self.fail_after:
            raise OSError("simulated stage controller not responding")
        self.n_moves += 1
        now = self.clock()
        motor, load = self.motor_um(now), self.sample_position_um(now)
        x, y = self.get_position_um()
        target = (self._q(x + dx_um), self._q(y + dy_um))
        half = self.backlash_um / 2
        end = tuple(
            min(max(s, t - half), t + half) for s, t in zip(load, target, strict=True)
        )
        duration = (
            math.hypot(target[0] - motor[0], target[1] - motor[1]) / self.speed_um_s
        )
        self._motor0, self._motor1 = motor, target
        self._load0, self._load1 = load, (end[0], end[1])
        self._t0, self._t1 = now, now + duration
        self._settled = self._t1 + self.settle_s

    def is_busy(self) -> bool:
        """Return True while moving or settling."""
        return self.clock() < self._settled

    def wait(self, timeout_s: float) -> None:
        """Advance the simulated clock until the stage is idle."""
        remaining = self._settled - self.clock()
        if remaining > timeout_s:
            raise TimeoutError(f"stage busy for {remaining:.3f} s > {timeout_s} s")
        self.clock.sleep(remaining)
