"""'ok' means right: no hard case is reported ok more than 0.5 px off."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from stagelock import Registrar, estimate_shifts
from stagelock.registration._verify import (
    better_alternative,
    overview,
    overview_factor,
)
from stagelock.sim import CameraNoise, fourier_shift, sample_image

from ._corpus import RIGHT_PX, HardCase, corpus

CASES = corpus()
# the rule must not be met by refusing everything: these must stay measurable
MUST_MEASURE = {
    "overlap--44-44",
    "overlap-+44+44",
    "padfield-25pct-zeroed",
    "half-zeroed",
    "focus-vs-defocused-ref-0",
    "defocused-vs-focus-ref-0",
    "lattice-+3.3-2.1",
    "lattice-+13.7+0.4",
    "capture-+27.0-3.0",
}


@pytest.mark.parametrize(
    "coverage", [None, 1.0, 0.02], ids=["default", "coverage-1", "coverage-0.02"]
)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ok_is_right(case: HardCase, coverage: float | None) -> None:
    est = Registrar(case.reference, coverage=coverage, **case.options).measure(
        case.frame
    )
    if case.name in MUST_MEASURE:
        assert est.ok, est
    if est.ok:
        err = math.hypot(est.dx_px - case.dx, est.dy_px - case.dy)
        assert err <= RIGHT_PX, f"ok but {err:.2f} px off (confidence {est.confidence})"
    elif not est.status.has_shift:
        assert math.isnan(est.dx_px) and math.isnan(est.dy_px)


def _faint_smooth_movie(
    peak_photons: float, blur_px: float, n_frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth sample under few photons: its templates' gradients are mostly noise."""
    sharp = sample_image((256, 256)).astype(np.float64)
    base = cv2.GaussianBlur(sharp, (0, 0), blur_px)
    rng = np.random.default_rng(3)
    noise = CameraNoise(peak_photons=peak_photons)
    steps = rng.normal(0.0, 0.5, (n_frames, 2))
    steps[0] = 0.0
    truth = np.cumsum(steps, axis=0)
    frames = np.stack([noise.expose(fourier_shift(base, *d), rng) for d in truth])
    return frames, truth


@pytest.mark.parametrize(
    "coverage", [None, 1.0, 0.01], ids=["default", "coverage-1", "coverage-0.01"]
)
def test_ok_is_right_while_tracking_a_noise_dominated_sample(
    coverage: float | None,
) -> None:
    # tracked from the last frame, a template that is mostly noise agrees with
    # itself wherever the fit starts: once 15 of 18 frames were ok, up to 2 px off
    frames, truth = _faint_smooth_movie(20.0, 3.0, 24)
    registrar = Registrar(frames[0], max_shift_px=10, coverage=coverage)
    for frame, (dx, dy) in zip(frames, truth, strict=True):
        est = registrar.measure(frame)
        if est.ok:
            assert math.hypot(est.dx_px - dx, est.dy_px - dy) <= RIGHT_PX, est


def test_small_coverage_falls_back_to_the_default_regions() -> None:
    frames, truth = _faint_smooth_movie(30.0, 2.0, 16)

    def worst_px(**options: float) -> float:
        est = estimate_shifts(frames, max_shift_px=10, **options)
        return float(np.nanmax(np.hypot(*(est - truth).T)))

    default = worst_px()
    # 16 px squares of a faint smooth sample alone are pixels off ...
    assert worst_px(region_size_px=16) > 2.0
    # ... where the coverage shrinks the regions to them, the default regions
    # measure the frames they cannot trust
    assert worst_px(coverage=0.01) <= default + 1e-9
    assert default < 1.0


@pytest.mark.parametrize("coverage", [0.05, 0.1, 0.25, 0.5])
def test_a_lattice_is_measured_right_at_every_coverage(coverage: float) -> None:
    # regions too small to hold a vacancy agree on a shift one period off (at
    # 0.1 once reported ok, 12 px off); the reduced overlap agrees better with
    # the true period, so the shrunk regions' answer is not trusted and the
    # default regions measure the frame
    for case in (c for c in CASES if c.name.startswith("lattice")):
        est = Registrar(case.reference, coverage=coverage, **case.options).measure(
            case.frame
        )
        assert est.ok, (case.name, est)
        err = math.hypot(est.dx_px - case.dx, est.dy_px - case.dy)
        assert err <= 0.05, f"{case.name}: {err:.3f} px off"


def test_another_period_that_agrees_better_is_found() -> None:
    case = next(c for c in CASES if c.name == "lattice-+13.7+0.4")
    factor = overview_factor(case.reference.shape)
    ref_small = overview(case.reference, factor)
    frame_small = overview(case.frame, factor)
    max_shift = case.options["max_shift_px"]
    # one 12 px period short of the truth: the true shift agrees better
    alt = better_alternative(ref_small, frame_small, 0.4, 1.7, factor, max_shift)
    assert alt is not None
    assert abs(alt[0] - case.dy) <= factor and abs(alt[1] - case.dx) <= factor
    # at the truth no other period does
    assert (
        better_alternative(ref_small, frame_small, case.dy, case.dx, factor, max_shift)
        is None
    )
