from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stagelock.sim import create_simulated_core, run_simulated, summarize
from stagelock.stage import (
    Calibration,
    CalibrationError,
    MMStageDriver,
    StageDriver,
    calibrate,
)


def _release(core: object) -> None:
    scope = getattr(core, "simulation", None)
    if scope is not None:
        scope.close()


@pytest.fixture
def make_core() -> Iterator[object]:
    cores: list[object] = []

    def make(**settings: object) -> object:
        base = {"shape_px": (192, 192), "random_walk_um_per_sqrt_s": 0.0}
        core = create_simulated_core({**base, **settings})
        cores.append(core)
        return core

    yield make
    for core in cores:
        _release(core)
    cores.clear()
    gc.collect()


CASES = [
    {"pixel_size_um": 0.65, "rotation_deg": 0.0},
    {"pixel_size_um": 0.3, "rotation_deg": 25.0, "flip_y": True},
    {"pixel_size_um": 1.2, "rotation_deg": -70.0, "backlash_um": 0.5},
]


@pytest.mark.parametrize("case", CASES, ids=["plain", "rot25_flip", "rot-70_backlash"])
def test_calibration_recovers_geometry(make_core, case, tmp_path: Path) -> None:
    core = make_core(creep_um_per_s=(0.2, -0.1), **case)
    driver = MMStageDriver(core)
    assert isinstance(driver, StageDriver)
    start = driver.get_position_um()
    cal = calibrate(core)
    assert cal.pixel_size_um == pytest.approx(case["pixel_size_um"], rel=0.01)
    rot = ((cal.rotation_deg - case["rotation_deg"]) + 180) % 360 - 180
    assert abs(rot) < 0.5
    assert cal.flipped is bool(case.get("flip_y", False))
    assert cal.residual_px < 0.3
    # the full matrix, against the simulator's own geometry
    truth = np.linalg.inv(-core.simulation.settings.camera_matrix)
    np.testing.assert_allclose(
        cal.px_to_um_matrix, truth, atol=0.01 * case["pixel_size_um"]
    )
    # the stage is back where it started
    assert driver.get_position_um() == pytest.approx(start, abs=0.02)
    # round trip through the TOML file
    path = cal.to_file(tmp_path / "calibration.toml")
    again = Calibration.from_file(path)
    np.testing.assert_allclose(again.px_to_um_matrix, cal.px_to_um_matrix)
    assert again.residual_px == pytest.approx(cal.residual_px)
    assert "[calibration]" in path.read_text()


def test_calibration_convention_cancels_shift() -> None:
    cal = Calibration.from_geometry(0.5, rotation_deg=30.0, flipped=True)
    move = cal.px_to_um(3.0, -2.0)
    assert cal.um_to_px(*move) == pytest.approx((3.0, -2.0))
    plain = Calibration.from_geometry(2.0)
    # usual microscope: a +x stage move moves the image towards -x
    assert plain.um_to_px(2.0, 0.0) == pytest.approx((-1.0, 0.0))


def test_calibration_refuses_a_stage_that_does_not_move_the_sample(make_core) -> None:
    core = make_core()
    scope = core.simulation
    # snapping a static image: the stage moves but the picture never changes
    still = scope.render_clean(0.0, 0.0)
    with pytest.raises(CalibrationError, match="moves the image measurably"):
        calibrate(core, snap=lambda: still)


def test_calibration_refuses_degenerate_fit(make_core) -> None:
    core = make_core()
    scope = core.simulation
    driver = MMStageDriver(core)

    def one_axis() -> np.ndarray:
        # a camera that only sees the x axis of the stage: a degenerate response
        x, _ = driver.get_position_um()
        return scope.render_clean(-x / 0.65, 0.0)

    with pytest.raises(CalibrationError, match=r"degenerate|less than 0\.5 px"):
        calibrate(core, snap=one_axis, step_um=5.0)


def test_calibration_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[calibration]\npx_to_um = [1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.toml: calibration.px_to_um"):
        Calibration.from_file(bad)
    bad.write_text("[calibration]\npx_to_um = [[1, 2], [2, 4]]\n")
    with pytest.raises(ValueError, match="singular"):
        Calibration.from_file(bad)
    bad.write_text("nope = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        Calibration.from_file(bad)


def test_closed_loop_on_simulated_microscope(make_core) -> None:
    # 1 px/s creep through the real pymmcore-plus path, short enough for CI
    core = make_core(
        pixel_size_um=0.5,
        rotation_deg=15.0,
        creep_um_per_s=(0.4, 0.3),
        random_walk_um_per_sqrt_s=0.02,
        stage_step_um=0.02,
        backlash_um=0.1,
        exposure_ms=5.0,
    )
    trace = run_simulated(core, 90, interval_s=0.04, bump_frame=50, bump_px=(10.0, 0.0))
    result = summarize(trace, lock_frames=20, bump_window_s=2.0)
    # 0.3 px at the 25 fps asked for; a slower host delivers the frames further
    # apart and the creep between them (1 px/s here) adds to the lag, about
    # v T / gain (CI measured 0.31 px)
    creep_px_per_s = math.hypot(0.4, 0.3) / 0.5
    interval_s = float(np.median(np.diff(trace.time_s)))
    bound_px = 0.22 + 2.0 * creep_px_per_s * interval_s
    assert result["residual_rms_px"] <= bound_px, (result, interval_s)
    assert result["overshoot_pct"] <= 10
    assert not result["oscillating"]
    assert result["max_travel_um"] < 20
    assert math.isfinite(trace.measured_px[-1, 0])


@pytest.fixture
def demo_core() -> Iterator[object]:
    pytest.importorskip("mm_test_adapters")
    from pymmcore_plus import CMMCorePlus

    core = CMMCorePlus()
    try:
        core.loadSystemConfiguration()
    except Exception as exc:  # pragma: no cover - depends on the machine
        del core
        gc.collect()
        pytest.skip(f"Micro-Manager demo devices unavailable: {exc}")
    core.setProperty("Camera", "Mode", "Fluorescent Beads")
    yield core
    core.unloadAllDevices()
    del core
    gc.collect()


def test_calibration_on_compiled_demo_devices(demo_core) -> None:
    cal = calibrate(demo_core, settle_s=0.0)
    # DemoCamera: the image moves opposite to the stage, 1 px per µm
    np.testing.assert_allclose(cal.px_to_um_matrix, -np.eye(2), atol=0.02)
    assert cal.pixel_size_um == pytest.approx(1.0, rel=0.01)
    assert not cal.flipped and abs(cal.rotation_deg) < 0.5
