"""The per-position lock in real MDAs: simulated microscope and compiled demo core."""

from __future__ import annotations

import gc
import logging
import math
from typing import Any

import numpy as np
import pytest
import useq

from stagelock import attach
from stagelock.sim import EventClock, create_simulated_core, run_mda_trial
from stagelock.sim._demo import calibration_of
from stagelock.sources import release_core
from stagelock.stage import Alarm, LockStatus, PositionKey

# camera rotated and mirrored against the stage, creeping ~1.2 µm/s (1 px/µm):
# 24 time points 1 s apart drift ~27 px; the world is one seamless 3x upscale
# of the sample, so positions ~400 µm apart image distinct texture
DRIFTING: dict[str, Any] = {
    "shape_px": [128, 128],
    "pixel_size_um": 1.0,
    "rotation_deg": 12.0,
    "flip_x": True,
    "creep_um_per_s": [1.0, -0.6],
    "random_walk_um_per_sqrt_s": 0.0,
    "exposure_ms": 1.0,
    "stage_speed_um_per_s": 50_000.0,
    "stage_settle_ms": 1.0,
    "peak_photons": 2000.0,
    "world_pad_px": 640,
}
# three positions on a circle of radius 235 µm: 407 µm apart
POSITIONS = [
    {"x": 0.0, "y": 235.0, "name": "A"},
    {"x": -203.5, "y": -117.5, "name": "B"},
    {"x": 203.5, "y": -117.5, "name": "C"},
]


@pytest.fixture
def make_core():
    cores: list[Any] = []

    def make(settings: dict[str, Any] | None = None, clock: EventClock | None = None):
        clock = clock or EventClock(interval_s=1.0, position_s=0.1)
        core = create_simulated_core({**DRIFTING, **(settings or {})}, clock=clock)
        core.mda.events.eventStarted.connect(clock.on_event)
        for preset in ("DAPI", "FITC"):  # two (optically identical) channels
            core.defineConfig("Channel", preset)
        core.setChannelGroup("Channel")
        # one snap per event (a hardware-sequenced batch costs ~0.1 s here)
        core.mda.engine.use_hardware_sequencing = False
        cores.append(core)
        return core, clock

    # pymmcore-plus logs every event's repr at INFO: 70 ms each on a busy machine
    mm_logger = logging.getLogger("pymmcore-plus")
    level = mm_logger.level
    mm_logger.setLevel(logging.WARNING)
    yield make
    mm_logger.setLevel(level)
    for core in cores:
        release_core(core)


def sequence(*, loops: int = 24, z: bool = False) -> useq.MDASequence:
    return useq.MDASequence(
        stage_positions=POSITIONS,
        channels=["DAPI", "FITC"],
        time_plan={"interval": 0, "loops": loops},
        z_plan={"range": 2.0, "step": 1.0} if z else None,
        axis_order="tpcz",
    )


def test_positions_far_apart_image_distinct_texture(make_core):
    core, _ = make_core()
    images = []
    for pos in POSITIONS:
        core.setXYPosition(pos["x"], pos["y"])
        core.waitForDevice("XYStage")
        images.append(core.snap().astype(np.float64))
    for i in range(3):
        for j in range(i + 1, 3):
            corr = np.corrcoef(images[i].ravel(), images[j].ravel())[0, 1]
            assert abs(corr) < 0.3


def test_lock_holds_every_position_of_a_drifting_mda(make_core):
    # with the lock: calibration measured at the start position, then the MDA
    core, clock = make_core()
    with attach(core, feedback=True, clock=clock, max_shift_px=40) as lock:
        assert core.mda.engine is lock.engine
        locked = run_mda_trial(core, sequence(), lock)
        states = lock.positions
    # without: the same acquisition on an identical microscope
    free_core, _ = make_core()
    free = run_mda_trial(free_core, sequence())

    assert len(locked.frames) == len(free.frames) == 3 * 24 * 2
    for p in range(3):
        worst = float(locked.residuals(p, from_t=6).max())
        assert worst <= 0.5, f"position {p}: {worst:.2f} px"
        assert float(free.residuals(p).max()) >= 15.0
        # the uncorrected drift the trial reconstructs is what the free run saw
        np.testing.assert_allclose(
            locked.residuals(p, uncorrected=True), free.residuals(p), atol=0.05
        )
    assert [s.name for s in states.values()] == ["A", "B", "C"]
    assert all(s.status is LockStatus.OK for s in states.values())
    assert all(s.n_measured == 24 for s in states.values())
    # each position's offset cancels the drift it saw (27 µm of creep)
    for s in states.values():
        assert math.hypot(s.offset_x_um, s.offset_y_um) > 20.0
        assert s.velocity_px_s is not None
    assert locked.n_corrections >= 3 * 20


def test_lock_holds_a_z_stack_measuring_one_channel_at_the_middle_plane(make_core):
    core, clock = make_core()
    cal = calibration_of(core.simulation)
    with attach(core, feedback=True, calibration=cal, clock=clock) as lock:
        trial = run_mda_trial(core, sequence(z=True), lock)
        estimates = lock.estimates
    assert len(trial.frames) == 3 * 24 * 2 * 3
    # only the first channel at the middle plane is measured...
    assert len(estimates) == 3 * 24
    assert {(e.channel, e.z) for e in estimates} == {("DAPI", 1)}
    assert lock.followers == 3 * 24 * 5
    # ...and every channel and plane gets its position's correction
    for p in range(3):
        worst = float(trial.residuals(p, from_t=6).max())
        assert worst <= 0.5, f"position {p}: {worst:.2f} px"
        assert float(trial.residuals(p, uncorrected=True).max()) >= 15.0


@pytest.mark.parametrize(
    ("lock_channel", "lock_z", "expected"),
    [
        (None, None, {("DAPI", 1)}),
        ("FITC", None, {("FITC", 1)}),
        (1, 0, {("FITC", 0)}),
    ],
)
def test_lock_selector_picks_one_channel_and_plane(lock_channel, lock_z, expected):
    from stagelock.stage import LockSelector

    selector = LockSelector(lock_channel, lock_z)
    seq = sequence(loops=2, z=True)
    selector.begin(seq)
    picked = {(e.channel.config, e.index["z"]) for e in seq if selector.is_lock(e)}
    assert picked == expected


def test_original_engine_is_back_after_the_context_and_after_an_exception(make_core):
    core, clock = make_core()
    original = core.mda.engine
    cal = calibration_of(core.simulation)
    with attach(core, feedback=True, calibration=cal, clock=clock) as lock:
        assert core.mda.engine is lock.engine is not original
    assert core.mda.engine is original
    with pytest.raises(RuntimeError, match="boom"):
        with attach(core, feedback=True, calibration=cal, clock=clock):
            core.mda.run(sequence(loops=2))
            raise RuntimeError("boom")
    assert core.mda.engine is original
    # an acquisition after the context is not corrected any more
    core.mda.run(useq.MDASequence(stage_positions=[(10.0, 5.0)]))
    assert core.getXYPosition() == pytest.approx((10.0, 5.0), abs=0.02)


class BumpedDrift:
    """The microscope's drift plus one sudden step of the sample."""

    def __init__(self, base, at_s: float, step_um: tuple[float, float]) -> None:
        self.base, self.at_s, self.step_um = base, at_s, step_um

    def drift_um(self, t_s: float) -> tuple[float, float]:
        x, y = self.base.drift_um(t_s)
        if t_s >= self.at_s:
            return x + self.step_um[0], y + self.step_um[1]
        return x, y


def test_a_lost_lock_holds_its_offset_and_the_acquisition_goes_on(make_core):
    core, clock = make_core()
    # at time point 8 the sample jumps 40 µm: beyond max_shift_px (20 px)
    core.simulation.drift = BumpedDrift(core.simulation.drift, 8.0, (40.0, 0.0))
    alarms: list[tuple[PositionKey, Alarm, str]] = []
    with attach(
        core,
        feedback=True,
        calibration=calibration_of(core.simulation),
        clock=clock,
        on_alarm=lambda key, alarm, msg: alarms.append((key, alarm, msg)),
        max_shift_px=80,
    ) as lock:
        trial = run_mda_trial(core, sequence(loops=12), lock)
        states = lock.positions
        corrections = lock.corrections
    assert len(trial.frames) == 3 * 12 * 2  # the acquisition went on
    lost = [a for a in alarms if a[1] is Alarm.LOCK_LOST]
    assert sorted(a[0].p for a in lost) == [0, 1, 2]
    assert "position 1 ('B')" in next(a[2] for a in lost if a[0].p == 1)
    assert "continues uncorrected" in lost[0][2]
    for s in states.values():
        assert s.status is LockStatus.LOST
    # nothing moved on the refused frames: the offsets stayed where they were
    refused = [c for c in corrections if c.status.value == "refused"]
    assert refused and all(c.move_x_um == c.move_y_um == 0.0 for c in refused)
    by_t = {}
    for e in lock.estimates:
        by_t.setdefault(e.position, {})[e.mda_index["t"]] = (
            e.offset_x_um,
            e.offset_y_um,
        )
    for p, offsets in by_t.items():
        assert offsets[9] == offsets[10] == offsets[11], p


def test_travel_limit_per_position_around_its_planned_coordinates(make_core):
    core, clock = make_core()
    with attach(
        core,
        feedback=True,
        calibration=calibration_of(core.simulation),
        clock=clock,
        stage={"travel_limit_um": 4.0},
    ) as lock:
        run_mda_trial(core, sequence(loops=12), lock)
        estimates = lock.estimates
        states = lock.positions
    assert max(max(abs(e.offset_x_um), abs(e.offset_y_um)) for e in estimates) <= 4.0
    assert all(s.alarm is Alarm.TRAVEL_LIMIT for s in states.values())
    assert all("position" in s.alarm_message for s in states.values())


# -- the compiled demo devices ----------------------------------------------------


@pytest.fixture
def demo_core():
    from pymmcore_plus import CMMCorePlus

    core = CMMCorePlus()
    try:
        core.loadSystemConfiguration()
    except Exception as error:  # adapters present but unusable here
        release_core(core)
        pytest.skip(f"demo configuration does not load: {error}")
    try:
        core.setProperty("Camera", "Mode", "Fluorescent Beads")
        core.setExposure(5.0)
        yield core
    finally:
        release_core(core)
        del core
        gc.collect()


@pytest.mark.parametrize("feedback", [False, True], ids=["measure", "feedback"])
def test_demo_positions_20_um_apart_each_report_zero(demo_core, feedback):
    from stagelock.stage import Calibration

    core = demo_core
    original = core.mda.engine
    seq = useq.MDASequence(
        stage_positions=[(0.0, 0.0), (20.0, 0.0), (0.0, 20.0)],
        time_plan={"interval": 0, "loops": 3},
    )
    # the demo camera moves its beads 1 px per µm against the stage
    cal = Calibration.from_geometry(1.0)
    with attach(core, feedback=feedback, calibration=cal, max_shift_px=30) as lock:
        core.mda.run(seq)
        assert lock.wait_idle(20.0)
        estimates = lock.estimates
        states = lock.positions
    assert core.mda.engine is original
    # a position's frame still waiting when its next one arrives is replaced
    # (latest wins per position), never another position's
    assert len(estimates) + lock.skipped == 9
    assert {e.position for e in estimates} == {0, 1, 2}
    for e in estimates:
        assert e.status.value == "ok"
        assert math.hypot(e.dx_px, e.dy_px) < 0.2, e
    assert all(s.status is LockStatus.OK for s in states.values())
