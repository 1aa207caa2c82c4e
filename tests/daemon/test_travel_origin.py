"""The travel limit holds across rereferences; only reset-origin moves it."""

from __future__ import annotations

import numpy as np

from stagelock import ShiftEstimate, Status
from stagelock.config import StageSettings
from stagelock.sim import PlantStage, SimClock
from stagelock.stage import Alarm, Calibration, StageLoop

TRUE = Calibration.from_geometry(0.5, rotation_deg=20.0, flipped=True)
CAL = Calibration.from_geometry(0.505, rotation_deg=20.5, flipped=True)
LIMIT_UM = 0.5


def ok(dx: float, dy: float) -> ShiftEstimate:
    return ShiftEstimate(dx, dy, 0.9, Status.OK, 9, 0.02)


def drive(
    loop: StageLoop,
    stage: PlantStage,
    clock: SimClock,
    n: int,
    *,
    rereference_every: int | None = None,
    reset_origin_at: int | None = None,
) -> list[tuple[float, float]]:
    """Creep of 1 px/s the loop must chase; a rereference is a new image zero."""
    positions = []
    drift = np.zeros(2)
    zero = np.zeros(2)  # the image shift of the current reference
    for k in range(n):
        clock.sleep(0.1)
        drift += (0.1, 0.05)
        seen = drift + TRUE.um_to_px(*stage.sample_position_um(clock()))
        if rereference_every and k and k % rereference_every == 0:
            zero = seen.copy()  # ctl rereference: this frame becomes the reference
            loop.reset()
        if k == reset_origin_at:
            loop.reset_origin()
        m = seen - zero
        loop.update(k, clock(), ok(float(m[0]), float(m[1])))
        clock.sleep(0.01)
        positions.append(stage.get_position_um())
    return positions


def make() -> tuple[StageLoop, PlantStage, SimClock]:
    clock = SimClock(1000.0)
    stage = PlantStage(clock, step_um=0.0, settle_s=0.02)
    settings = StageSettings(feedback=True, travel_limit_um=LIMIT_UM)
    return StageLoop(stage, CAL, settings, clock=clock), stage, clock


def test_three_rereferences_do_not_walk_past_the_limit() -> None:
    loop, stage, clock = make()
    start = stage.get_position_um()
    positions = np.array(drive(loop, stage, clock, 200, rereference_every=50))
    # the creep would take the stage ~10 µm away; the limit stays ±0.5 µm around
    # the original start through all three new references
    far = np.max(np.abs(positions - np.asarray(start)), axis=0)
    assert np.all(far <= LIMIT_UM + 1e-9), far
    assert np.max(far) > 0.9 * LIMIT_UM  # it did run into the limit
    assert loop.alarm is Alarm.TRAVEL_LIMIT
    assert loop.start_position_um == start
    assert loop.travelled_um <= LIMIT_UM + 1e-9


def test_reset_origin_recentres_the_limit() -> None:
    loop, stage, clock = make()
    start = np.asarray(stage.get_position_um())
    positions = np.array(drive(loop, stage, clock, 150, reset_origin_at=80))
    origin = np.asarray(loop.start_position_um)
    assert np.max(np.abs(origin - start)) > 0.9 * LIMIT_UM  # where it was at 80
    after = np.max(np.abs(positions[81:] - origin), axis=0)
    assert np.all(after <= LIMIT_UM + 1e-9)
    assert np.max(np.abs(positions[-1] - start)) > 1.5 * LIMIT_UM


def test_restore_continues_from_a_saved_origin() -> None:
    loop, stage, clock = make()
    drive(loop, stage, clock, 60)
    origin, ref = loop.start_position_um, loop.reference_position_um
    assert origin is not None and ref is not None
    # a restarted daemon: a new loop on the same (real, unmoved) stage
    again = StageLoop(
        stage, CAL, StageSettings(feedback=True, travel_limit_um=LIMIT_UM), clock=clock
    )
    again.restore(origin, ref)
    assert again.start_position_um == origin
    assert again.reference_position_um == ref
    assert again.status()["start_um"] == list(origin)
