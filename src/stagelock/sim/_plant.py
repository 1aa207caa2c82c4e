"""A simulated-time XY stage plant for controller tests and benchmarks.

Unlike the simulated microscope (real time), everything here runs on a
:class:`SimClock` that only advances when told, so hundreds of control cycles with
realistic stage delay, settle time, quantisation and backlash take milliseconds.
"""

from __future__ import annotations

from ._stage import StageMechanics

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
    """A :class:`~stagelock.stage.StageDriver` in simulated time.

    Speed, settle time, quantisation and backlash come from the one stage model,
    :class:`~stagelock.sim.StageMechanics`.

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
        self.fail_after = fail_after
        self.n_moves = 0
        self.mechanics = StageMechanics(
            speed_um_per_s=speed_um_s,
            settle_s=settle_s,
            step_um=step_um,
            backlash_um=backlash_um,
            clock=clock,
        )

    def motor_um(self, t: float | None = None) -> tuple[float, float]:
        """Motor position at ``t`` (default now)."""
        return self.mechanics.positions(t)[0]

    def sample_position_um(self, t: float | None = None) -> tuple[float, float]:
        """Where the carriage really is (lags the motor after reversals)."""
        return self.mechanics.positions(t)[1]

    def get_position_um(self) -> tuple[float, float]:
        """Return the motor position (what the controller reports)."""
        x, y = self.motor_um()
        q = self.mechanics.quantise
        return q(x), q(y)

    def move_relative_um(self, dx_um: float, dy_um: float) -> None:
        """Start a relative move; returns at once."""
        if self.fail_after is not None and self.n_moves >= self.fail_after:
            raise OSError("simulated stage controller not responding")
        self.n_moves += 1
        x, y = self.get_position_um()
        self.mechanics.move_to(x + dx_um, y + dy_um)

    def is_busy(self) -> bool:
        """Return True while moving or settling."""
        return self.mechanics.busy()

    def wait(self, timeout_s: float) -> None:
        """Advance the simulated clock until the stage is idle."""
        remaining = self.mechanics.settled_at() - self.clock()
        if remaining > timeout_s:
            raise TimeoutError(f"stage busy for {remaining:.3f} s > {timeout_s} s")
        self.clock.sleep(remaining)
