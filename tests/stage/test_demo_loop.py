"""The loop closed on Micro-Manager's own compiled demo devices (mm-test-adapters).

In ``Mode = "Fluorescent Beads"`` DemoCamera renders a bead field that follows
DemoXYStage, the image moving *against* the stage at 1 px per µm. Nothing here is
told that: the calibration has to find the sign and the scale, and the loop has to
undo bumps given to the stage behind its back.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pytest

from stagelock.config import StageSettings
from stagelock.registration import Registrar, Status
from stagelock.sources import release_core
from stagelock.stage import (
    Calibration,
    CorrectionStatus,
    MMStageDriver,
    StageLoop,
    calibrate,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pymmcore_plus import CMMCorePlus

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mm_test_adapters") is None,
    reason="mm-test-adapters (compiled Micro-Manager demo devices) not installed",
)

CAMERA = "Camera"
XY = "XY"
SETTLED_PX = 0.3
MAX_FRAMES = 40  # per bump; the loop needs ~8 (2 frames per correction)


@dataclass
class Demo:
    core: CMMCorePlus
    calibration: Calibration
    before: np.ndarray  # image at the start position, before the calibration


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    """The demo configuration in bead mode, calibrated once for the module."""
    from pymmcore_plus import CMMCorePlus

    core = CMMCorePlus()
    try:
        core.loadSystemConfiguration()  # mm-test-adapters' MMConfig_demo.cfg
        assert core.getCameraDevice() == CAMERA and core.getXYStageDevice() == XY
        assert "Fluorescent Beads" in core.getAllowedPropertyValues(CAMERA, "Mode")
        core.setProperty(CAMERA, "Mode", "Fluorescent Beads")
        before = core.snap()
        calibration = calibrate(core)
        yield Demo(core, calibration, before)
    finally:
        # a compiled core alive at interpreter exit can abort the process
        release_core(core)
        del core
        gc.collect()


def test_bead_field_is_static_and_follows_the_stage(demo: Demo) -> None:
    core = demo.core
    registrar = Registrar(demo.before)
    # the beads are not re-drawn per snap, nor after the calibration's round trip
    for _ in range(2):
        est = registrar.measure(core.snap())
        assert est.status is Status.OK
        assert math.hypot(est.dx_px, est.dy_px) < 0.01
    # ... and a stage move drags them the other way, 1 px per µm
    x0, y0 = core.getXYPosition(XY)
    core.setRelativeXYPosition(XY, 3.0, 2.0)
    core.waitForDevice(XY)
    try:
        x, y = core.getXYPosition(XY)
        est = registrar.measure(core.snap())
        assert est.dx_px == pytest.approx(-(x - x0), abs=0.02)
        assert est.dy_px == pytest.approx(-(y - y0), abs=0.02)
    finally:
        core.setXYPosition(XY, x0, y0)
        core.waitForDevice(XY)


def test_calibration_finds_the_sign_and_the_scale(demo: Demo) -> None:
    cal = demo.calibration
    np.testing.assert_allclose(cal.px_to_um_matrix, -np.eye(2), atol=0.01)
    assert cal.pixel_size_um == pytest.approx(1.0, rel=0.01)
    assert not cal.flipped
    assert abs(cal.rotation_deg) < 0.5
    assert cal.residual_px < 0.05
    # the sign: a +1 µm stage move is a negative image shift on both axes
    dx_px, dy_px = cal.um_to_px(1.0, 1.0)
    assert dx_px == pytest.approx(-1.0, abs=0.01)
    assert dy_px == pytest.approx(-1.0, abs=0.01)


@dataclass(frozen=True)
class Bump:
    name: str
    stage_um: tuple[float, float]


BUMPS = [Bump("plus_x_minus_y", (6.0, -4.0)), Bump("minus_x_plus_y", (-6.0, 4.0))]


@pytest.mark.parametrize("bump", BUMPS, ids=lambda b: b.name)
def test_loop_undoes_a_bump(demo: Demo, bump: Bump) -> None:
    core = demo.core
    home = core.getXYPosition(XY)
    registrar = Registrar(core.snap())
    loop = StageLoop(
        MMStageDriver(core, XY),
        demo.calibration,
        StageSettings(feedback=True, settle_s=0.0),
    )
    frame = 0

    def step() -> tuple[float, float]:
        nonlocal frame
        t = time.time()  # exposure starts after this: a conservative frame time
        est = registrar.measure(core.snap())
        assert est.status is Status.OK, est
        correction = loop.update(frame, t, est)
        if correction is not None:
            assert correction.status is CorrectionStatus.MOVED, correction
        frame += 1
        return est.dx_px, est.dy_px

    # a still sample: the loop holds its start position without moving
    for _ in range(5):
        assert math.hypot(*step()) < 0.02
    assert loop.n_corrections == 0

    core.setRelativeXYPosition(XY, *bump.stage_um)  # behind the loop's back
    core.waitForDevice(XY)
    residuals = np.array([step() for _ in range(MAX_FRAMES)])

    # the bump is seen as the opposite image jump, then brought back
    expected = -np.asarray(bump.stage_um)
    np.testing.assert_allclose(residuals[0], expected, atol=0.05)
    size = np.hypot(residuals[:, 0], residuals[:, 1])
    settled = int(np.argmax(size < SETTLED_PX))
    assert size[settled] < SETTLED_PX, f"not settled in {MAX_FRAMES} frames"
    assert settled <= 12
    assert np.all(size[settled:] < SETTLED_PX)  # and it stays there
    # no overshoot: along the bump, the residual never passes zero by > 10 %
    direction = expected / np.hypot(*expected)
    along = residuals @ direction
    overshoot = max(0.0, -float(along.min())) / float(np.hypot(*expected))
    assert overshoot <= 0.10
    # no sign alternation on either axis (beyond the measurement floor)
    for axis in (0, 1):
        signs = np.sign(residuals[:, axis][np.abs(residuals[:, axis]) > 0.05])
        assert np.all(signs == np.sign(expected[axis])), residuals[:, axis]
    # the stage is back where it was
    core.waitForDevice(XY)
    x, y = core.getXYPosition(XY)
    assert math.hypot(x - home[0], y - home[1]) < 0.3
    assert 2 <= loop.n_corrections <= 6
    assert loop.alarm is None
