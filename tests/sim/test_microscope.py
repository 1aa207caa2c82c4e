from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pytest

# tests/ may or may not be a package (another suite adds tests/__init__.py)
from helpers import scope_factory, snap, wait_until
from stagelock import Registrar
from stagelock.config import SimulationSettings
from stagelock.sim import DriftModel, SimulatedMicroscope, create_simulated_core
from stagelock.sources import release_core


@pytest.fixture
def make_scope():
    yield from scope_factory()


@dataclass(frozen=True)
class Geometry:
    name: str
    rotation_deg: float
    flip_x: bool
    flip_y: bool
    expected_px: tuple[float, float]  # image shift for a (+20, +10) µm stage move


GEOMETRIES = [
    Geometry("plain", 0.0, False, False, (-40.0, -20.0)),
    Geometry("flip_x", 0.0, True, False, (40.0, -20.0)),
    Geometry("flip_y", 0.0, False, True, (-40.0, 20.0)),
    # R(90°) takes (x, y) to (-y, x): (-40, -20) -> (20, -40)
    Geometry("rot90", 90.0, False, False, (20.0, -40.0)),
    Geometry("rot90_flip_x", 90.0, True, False, (20.0, 40.0)),
]


@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: c.name)
def test_stage_move_shifts_image_by_geometry(make_scope, case: Geometry) -> None:
    scope = make_scope(
        {
            "rotation_deg": case.rotation_deg,
            "flip_x": case.flip_x,
            "flip_y": case.flip_y,
        }
    )
    core = scope.core
    assert core.getPixelSizeUm() == pytest.approx(0.5)
    reference = snap(scope)
    assert reference.dtype == np.uint16 and reference.shape == (256, 256)
    core.setXYPosition(20.0, 10.0)
    frame = snap(scope)
    assert core.getXYPosition() == pytest.approx((20.0, 10.0))
    est = Registrar(reference, max_shift_px=60).measure(frame)
    assert est.status.has_shift
    np.testing.assert_allclose((est.dx_px, est.dy_px), case.expected_px, atol=0.05)
    np.testing.assert_allclose(scope.true_image_shift_px(), case.expected_px, atol=1e-9)


def test_relative_moves_and_subpixel_rendering(make_scope) -> None:
    scope = make_scope({"stage_step_um": 0.0})
    core = scope.core
    reference = snap(scope)
    registrar = Registrar(reference, max_shift_px=20)
    core.setRelativeXYPosition(0.37, -1.11)
    est = registrar.measure(snap(scope))
    np.testing.assert_allclose((est.dx_px, est.dy_px), (-0.74, 2.22), atol=0.05)
    core.setRelativeXYPosition(-0.37, 1.11)
    est = registrar.measure(snap(scope))
    np.testing.assert_allclose((est.dx_px, est.dy_px), (0.0, 0.0), atol=0.05)


def test_move_takes_time_and_stage_is_busy_until_settled(make_scope) -> None:
    scope = make_scope({"stage_speed_um_per_s": 100.0, "stage_settle_ms": 300.0})
    core = scope.core
    assert not core.deviceBusy("XYStage")
    t0 = time.monotonic()
    core.setXYPosition(20.0, 0.0)  # 0.2 s of travel, then 0.3 s of settling
    assert core.deviceBusy("XYStage")
    x_now = core.getXYPosition()[0]
    assert x_now < 20.0  # not teleported
    # seen strictly between start and target while travelling
    wait_until(lambda: 1.0 < core.getXYPosition()[0] < 19.0, 1.0, "mid-travel")
    wait_until(lambda: core.getXYPosition()[0] == pytest.approx(20.0), 2.0, "arrival")
    assert core.deviceBusy("XYStage")  # arrived, still settling
    core.waitForDevice("XYStage")
    assert not core.deviceBusy("XYStage")
    assert time.monotonic() - t0 >= 0.2 + 0.3 - 0.01


def test_position_is_quantised_to_the_step(make_scope) -> None:
    scope = make_scope({"stage_step_um": 0.1})
    core = scope.core
    core.setXYPosition(1.234, -0.56)
    core.waitForDevice("XYStage")
    assert core.getXYPosition() == pytest.approx((1.2, -0.6))
    np.testing.assert_allclose(scope.stage_sample_position_um(), (1.2, -0.6))
    np.testing.assert_allclose(scope.true_image_shift_px(), (-2.4, 1.2), atol=1e-9)


def test_backlash_after_direction_reversal(make_scope) -> None:
    scope = make_scope({"backlash_um": 2.0, "stage_step_um": 0.0})
    core = scope.core
    core.setXYPosition(20.0, 0.0)  # approach from below: sample lags by 1 µm
    core.waitForDevice("XYStage")
    np.testing.assert_allclose(scope.stage_sample_position_um(), (19.0, 0.0))
    at_20 = snap(scope)
    core.setXYPosition(15.0, 0.0)  # reversal: the first 2 µm only take up play
    core.waitForDevice("XYStage")
    assert core.getXYPosition() == pytest.approx((15.0, 0.0))  # motor says 15
    np.testing.assert_allclose(scope.stage_sample_position_um(), (16.0, 0.0))
    est = Registrar(at_20, max_shift_px=20).measure(snap(scope))
    # the sample moved 3 µm, not 5: +6 px at 0.5 µm/px
    np.testing.assert_allclose((est.dx_px, est.dy_px), (6.0, 0.0), atol=0.05)


def test_travel_range_rejects_moves_outside(make_scope) -> None:
    scope = make_scope({"travel_range_um": [-100, 100, -50, 50]})
    with pytest.raises(Exception, match="outside the travel range"):
        scope.core.setXYPosition(0.0, 80.0)
    assert scope.core.getXYPosition() == pytest.approx((0.0, 0.0))


def test_drift_is_reproducible_with_a_seed() -> None:
    times = [0.0, 0.7, 3.3, 10.0, 120.0]
    a = DriftModel(random_walk_um_per_sqrt_s=0.1, bump_every_s=5.0, seed=7)
    b = DriftModel(random_walk_um_per_sqrt_s=0.1, bump_every_s=5.0, seed=7)
    c = DriftModel(random_walk_um_per_sqrt_s=0.1, bump_every_s=5.0, seed=8)
    forward = [a.drift_um(t) for t in times]
    backward = [b.drift_um(t) for t in reversed(times)][::-1]
    np.testing.assert_allclose(forward, backward)  # order of queries is irrelevant
    assert forward[0] == (0.0, 0.0)
    assert not np.allclose(forward[1:], [c.drift_um(t) for t in times[1:]])


def test_drift_components() -> None:
    creep = DriftModel(creep_um_per_s=(0.3, -0.2), random_walk_um_per_sqrt_s=0.0)
    np.testing.assert_allclose(creep.drift_um(10.0), (3.0, -2.0))
    bumps = DriftModel(
        creep_um_per_s=(0.0, 0.0),
        random_walk_um_per_sqrt_s=0.0,
        bump_every_s=2.0,
        bump_um=1.5,
        seed=3,
    )
    times = bumps.bump_times_s(60.0)
    assert 10 <= len(times) <= 60  # ~30 expected
    before, after = bumps.drift_um(times[0] - 1e-6), bumps.drift_um(times[0] + 1e-6)
    assert before == (0.0, 0.0)
    assert math.hypot(*after) == pytest.approx(1.5)
    walk = DriftModel(creep_um_per_s=(0.0, 0.0), random_walk_um_per_sqrt_s=0.5)
    # over many independent 100 s stretches the RMS step is 0.5 * sqrt(100) = 5 µm
    ends = np.array([walk.drift_um(100.0 * k) for k in range(1, 201)])
    steps = np.diff(ends, axis=0)
    assert np.std(steps) == pytest.approx(5.0, rel=0.15)


def test_camera_renders_drift_on_a_simulated_clock(make_scope) -> None:
    now = [1000.0]
    scope = make_scope(
        {"creep_um_per_s": [0.3, -0.2], "random_walk_um_per_sqrt_s": 0.0},
        clock=lambda: now[0],
    )
    reference = snap(scope)
    now[0] += 10.0  # 3 µm, -2 µm of drift: (+6, -4) px
    np.testing.assert_allclose(scope.true_drift_um(), (3.0, -2.0))
    est = Registrar(reference, max_shift_px=20).measure(snap(scope))
    np.testing.assert_allclose((est.dx_px, est.dy_px), (6.0, -4.0), atol=0.05)
    # moving the stage by the drift holds the image still
    scope.core.setXYPosition(3.0, -2.0)
    est = Registrar(reference, max_shift_px=20).measure(snap(scope))
    np.testing.assert_allclose((est.dx_px, est.dy_px), (0.0, 0.0), atol=0.05)


def test_snap_takes_the_exposure_and_sequences_do_not_flood(make_scope) -> None:
    scope = make_scope({"exposure_ms": 20.0})
    core = scope.core
    core.startContinuousSequenceAcquisition(0)
    try:
        time.sleep(0.3)
    finally:
        core.stopSequenceAcquisition()
    # one frame per exposure at most (plus the frame in flight); at least one,
    # however slowly a loaded host renders them
    assert 1 <= core.getRemainingImageCount() <= 0.3 / 0.020 + 2


def test_camera_fault_makes_snaps_fail(make_scope) -> None:
    scope = make_scope()
    scope.camera_fault = "camera unplugged"
    with pytest.raises(Exception, match="camera unplugged"):
        scope.core.snapImage()
    scope.camera_fault = None
    scope.core.snapImage()


def test_create_simulated_core_labels_and_truth() -> None:
    core = create_simulated_core({"shape_px": [64, 96], "exposure_ms": 1.0})
    try:
        assert core.getCameraDevice() == "Camera"
        assert core.getXYStageDevice() == "XYStage"
        assert core.getPixelSizeUm() == pytest.approx(0.65)
        core.snapImage()
        assert core.getImage().shape == (64, 96)
        scope = core.simulation
        assert isinstance(scope, SimulatedMicroscope)
        assert scope.settings.creep_um_per_s == (0.05, -0.03)
    finally:
        release_core(core)
        del core


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pixel_size": 0.5}, "pixel_size: Extra inputs are not permitted"),
        ({"pixel_size_um": -1.0}, "pixel_size_um: Input should be greater than 0"),
        ({"shape_px": [10]}, "shape_px.1: Field required"),
        ({"flip_x": "yes"}, "flip_x: Input should be a valid boolean"),
        ({"creep_um_per_s": [0.1, "a"]}, "creep_um_per_s.1: Input should be a valid"),
        ({"backlash_um": -0.1}, "backlash_um: Input should be greater than or equal"),
        ({"bump_um": float("nan")}, "bump_um: Input should be a finite number"),
    ],
)
def test_bad_settings_raise_value_error(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        SimulationSettings.from_mapping(settings)


def test_settings_accepts_lists_from_toml() -> None:
    settings = SimulationSettings.from_mapping(
        {"shape_px": [128, 64], "creep_um_per_s": [1, 2], "seed": 4}
    )
    assert settings.shape_px == (128, 64)
    assert settings.creep_um_per_s == (1.0, 2.0)
