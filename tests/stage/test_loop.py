from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
from pydantic import ValidationError

from stagelock import ShiftEstimate, Status
from stagelock.config import StageSettings
from stagelock.sim import PlantStage, SimClock
from stagelock.stage import (
    Alarm,
    Calibration,
    CorrectionStatus,
    LoopState,
    StageDriver,
    StageLoop,
)

TRUE = Calibration.from_geometry(0.5, rotation_deg=20.0, flipped=True)
# the controller works with a slightly wrong calibration, as in real life
CAL = Calibration.from_geometry(0.505, rotation_deg=20.5, flipped=True)


def ok(dx: float, dy: float) -> ShiftEstimate:
    return ShiftEstimate(dx, dy, 0.9, Status.OK, 9, 0.02)


@dataclass
class Run:
    residual: np.ndarray
    moves: list[tuple[float, float]]
    loop: StageLoop
    stage: PlantStage


def run_plant(
    n: int = 300,
    *,
    creep: tuple[float, float] = (1.0, 0.0),
    walk: float = 0.02,
    bump_at: int | None = None,
    bump: tuple[float, float] = (10.0, 0.0),
    settings: StageSettings | None = None,
    step_um: float = 0.02,
    backlash_um: float = 0.1,
    seed: int = 0,
) -> Run:
    clock = SimClock(1000.0)
    stage = PlantStage(clock, step_um=step_um, backlash_um=backlash_um, settle_s=0.03)
    loop = StageLoop(stage, CAL, settings or StageSettings(feedback=True), clock=clock)
    rng = np.random.default_rng(seed)
    drift = np.zeros(2)
    out, moves = [], []
    for k in range(n):
        clock.sleep(0.1)
        drift += np.asarray(creep) * 0.1 + rng.normal(0, walk, 2)
        if k == bump_at:
            drift += bump
        # the frame shows the carriage where it is mid-exposure
        m = drift + TRUE.um_to_px(*stage.sample_position_um(clock() + 0.005))
        m = m + rng.normal(0, 0.02, 2)
        c = loop.update(k, clock(), ok(float(m[0]), float(m[1])))
        if c is not None and c.status is not CorrectionStatus.REFUSED:
            moves.append((c.move_x_um, c.move_y_um))
        clock.sleep(0.01)
        out.append(m)
    return Run(np.array(out), moves, loop, stage)


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum(a**2, axis=1))))


def test_plant_stage_is_a_stage_driver() -> None:
    assert isinstance(PlantStage(SimClock()), StageDriver)


def test_locks_on_creep_with_feed_forward() -> None:
    run = run_plant()
    assert rms(run.residual[30:]) < 0.15
    # without feedback the same drift walks away
    assert abs(run.residual[-1, 0]) < 0.5
    assert run.loop.state is LoopState.TRACKING


def test_feed_forward_removes_creep_lag() -> None:
    without = run_plant(settings=StageSettings(feedback=True, feed_forward=False))
    with_ff = run_plant()
    # the pure integral loop lags by ~v·T/g; the feed-forward centres the error
    lag = float(np.mean(without.residual[50:, 0]))
    assert lag > 0.1
    assert abs(float(np.mean(with_ff.residual[50:, 0]))) < lag / 2


def test_step_response_without_overshoot_or_limit_cycle() -> None:
    run = run_plant(creep=(0.0, 0.0), walk=0.0, bump_at=100, backlash_um=0.2)
    after = run.residual[100:160, 0]
    assert after[0] > 9.5
    assert after.min() > -1.0  # < 10 % overshoot
    assert np.all(np.abs(run.residual[140:]) < 0.25)
    # once locked: no hunting (dead band), so no more moves at all
    late = list(run.moves[-10:])
    assert len(run.moves) < 30, late


def test_no_sustained_sign_alternation() -> None:
    run = run_plant(creep=(0.3, -0.2), walk=0.05, seed=3)
    xs = np.sign([m[0] for m in run.moves if m[0] != 0])
    alternations = best = 0
    for a, b in itertools.pairwise(xs):
        alternations = alternations + 1 if a != b else 0
        best = max(best, alternations)
    assert best <= 5


def test_travel_limit_clips_and_alarms() -> None:
    alarms: list[Alarm] = []
    settings = StageSettings(feedback=True, travel_limit_um=3.0)
    clock = SimClock()
    stage = PlantStage(clock)
    loop = StageLoop(
        stage, CAL, settings, clock=clock, on_alarm=lambda a, m: alarms.append(a)
    )
    # 10 px/s creep: the correction needed soon exceeds 3 µm
    run_status = []
    for k in range(200):
        clock.sleep(0.1)
        m = np.array([1.0 * k, 0.0]) + TRUE.um_to_px(*stage.sample_position_um())
        c = loop.update(k, clock(), ok(*map(float, m)))
        if c is not None:
            run_status.append(c.status)
    x, y = stage.get_position_um()
    assert max(abs(x), abs(y)) <= 3.0 + 1e-9
    assert loop.travelled_um <= 3.0 + 1e-9
    assert Alarm.TRAVEL_LIMIT in alarms
    assert CorrectionStatus.CLIPPED in run_status
    # the drift then runs out of the capture range: refused, not chased
    assert loop.alarm in (Alarm.TRAVEL_LIMIT, Alarm.LARGE_SHIFT)


@pytest.mark.parametrize(
    ("estimate", "alarm"),
    [
        (
            ShiftEstimate(3.0, 0.0, 0.1, Status.LOW_CONFIDENCE, 2, 0.3),
            Alarm.LOW_CONFIDENCE,
        ),
        (ShiftEstimate.failed(Status.NO_PEAK), Alarm.LOW_CONFIDENCE),
        (ok(25.0, 0.0), Alarm.LARGE_SHIFT),
    ],
    ids=["low_confidence", "no_peak", "too_large"],
)
def test_untrustworthy_frames_never_move(estimate: ShiftEstimate, alarm: Alarm) -> None:
    clock = SimClock()
    stage = PlantStage(clock)
    loop = StageLoop(stage, CAL, StageSettings(feedback=True), clock=clock)
    first = loop.update(0, clock(), estimate)
    assert first is not None and first.alarm is alarm
    assert first.status is CorrectionStatus.REFUSED
    assert first.move_x_um == first.move_y_um == 0.0
    # the alarm stands without repeating a record per frame
    clock.sleep(0.1)
    assert loop.update(1, clock(), estimate) is None
    assert stage.n_moves == 0 and loop.alarm is alarm
    # a good frame clears it and moves
    clock.sleep(0.1)
    c = loop.update(2, clock(), ok(2.0, 0.0))
    assert c is not None and c.status is CorrectionStatus.MOVED
    assert loop.alarm is None and stage.n_moves == 1
    msg = c.to_message()
    assert msg["schema"] == "stagelock.correction/2"
    assert msg["status"] == "moved" and msg["alarm"] is None
    # the move is the one that cancels 70 % of the shift
    expect = CAL.px_to_um(-1.4, 0.0)
    assert msg["move_x_um"] == pytest.approx(expect[0], abs=1e-9)


def test_stage_error_pauses_correction_and_measuring_continues() -> None:
    clock = SimClock()
    stage = PlantStage(clock, fail_after=1)
    alarms: list[str] = []
    loop = StageLoop(
        stage,
        CAL,
        StageSettings(feedback=True),
        clock=clock,
        on_alarm=lambda a, m: alarms.append(m),
    )
    assert loop.update(0, clock(), ok(2.0, 0.0)) is not None  # first move works
    clock.sleep(0.2)
    loop.update(1, clock(), ok(1.0, 0.0))
    clock.sleep(0.2)
    c = loop.update(2, clock(), ok(1.0, 0.0))
    records = [c] if c else []
    assert loop.state is LoopState.STAGE_ERROR
    assert loop.alarm is Alarm.STAGE_ERROR
    assert any("not responding" in m for m in alarms)
    # further frames are accepted (measuring continues) without touching the stage
    for k in range(3, 10):
        clock.sleep(0.1)
        assert loop.update(k, clock(), ok(1.0, 0.0)) is None
    assert stage.n_moves == 1
    assert records == [] or records[0].status is CorrectionStatus.STAGE_ERROR
    stage.fail_after = None
    loop.resume()
    assert loop.state is LoopState.TRACKING and loop.alarm is None
    clock.sleep(0.1)
    assert loop.update(10, clock(), ok(1.0, 0.0)) is not None
    assert stage.n_moves == 2


def test_pause_resume_and_feedback_off() -> None:
    clock = SimClock()
    stage = PlantStage(clock)
    loop = StageLoop(stage, CAL, StageSettings(feedback=True), clock=clock)
    loop.pause()
    assert loop.state is LoopState.PAUSED
    assert loop.update(0, clock(), ok(3.0, 0.0)) is None
    loop.resume()
    clock.sleep(0.1)
    assert loop.update(1, clock(), ok(3.0, 0.0)) is not None
    off = StageLoop(stage, CAL, StageSettings(), clock=clock)
    assert off.state is LoopState.OFF
    assert off.update(0, clock(), ok(3.0, 0.0)) is None


def test_frames_during_a_move_are_not_acted_upon() -> None:
    clock = SimClock()
    stage = PlantStage(clock, speed_um_s=10.0, settle_s=0.05)  # a slow stage
    loop = StageLoop(stage, CAL, StageSettings(feedback=True), clock=clock)
    assert loop.update(0, clock(), ok(8.0, 0.0)) is not None
    for k in range(1, 4):  # still moving: these frames show a half-moved stage
        clock.sleep(0.05)
        assert loop.update(k, clock(), ok(5.0, 0.0)) is None
    assert stage.n_moves == 1


def test_settings_are_strict() -> None:
    with pytest.raises(ValidationError, match="gain"):
        StageSettings(gain=1.5)
    with pytest.raises(ValidationError, match="Extra inputs"):
        StageSettings.model_validate({"gian": 0.5})
    with pytest.raises(ValidationError, match="travel_limit_um"):
        StageSettings(travel_limit_um=0)
    s = StageSettings.model_validate(
        {"feedback": True, "calibration": {"pattern": "grid"}}
    )
    assert s.calibration.pattern == "grid" and math.isclose(s.gain, 0.7)
