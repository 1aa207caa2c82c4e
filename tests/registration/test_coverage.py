"""The coverage knob, float16 input, reference chaining and the time budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from stagelock import Registrar, estimate_shifts, iter_estimates
from stagelock.registration import coverage_for_interval, shift_crlb
from stagelock.registration._budget import estimated_ms
from stagelock.registration._fullframe import FrameFit, NoiseModel, estimate_noise
from stagelock.sim import CameraNoise, fourier_shift, sample_image

SHAPE = (192, 192)
PEAK = 500.0


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    return sample_image(SHAPE).astype(np.float64)


@pytest.fixture(scope="module")
def movie(base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    noise = CameraNoise(peak_photons=PEAK)
    steps = rng.normal(0.0, 0.5, (12, 2))
    steps[0] = 0.0
    truth = np.cumsum(steps, axis=0)
    frames = np.stack([noise.expose(fourier_shift(base, *d), rng) for d in truth])
    return frames, truth


@pytest.mark.parametrize("coverage", [0.02, 0.1, 0.5, 1.0])
def test_every_coverage_recovers_the_drift(
    movie: tuple[np.ndarray, np.ndarray], coverage: float
) -> None:
    frames, truth = movie
    est = estimate_shifts(frames, coverage=coverage, max_shift_px=10)
    assert_allclose(est[0], 0.0, atol=0)
    assert np.all(np.hypot(*(est - truth).T) < 0.1)


def test_full_coverage_is_more_precise_and_near_the_bound(
    base: np.ndarray, movie: tuple[np.ndarray, np.ndarray]
) -> None:
    frames, truth = movie
    default = estimate_shifts(frames, max_shift_px=10)
    full = estimate_shifts(frames, max_shift_px=10, coverage=1.0)
    rms = {
        k: float(np.sqrt(np.mean(np.sum((v[1:] - truth[1:]) ** 2, axis=1))))
        for k, v in (("default", default), ("full", full))
    }
    noise = CameraNoise(peak_photons=PEAK)
    electrons = base * PEAK + noise.background_photons
    var = (electrons + noise.read_noise_e**2) / noise.gain_e_per_adu**2
    bound = shift_crlb(electrons / noise.gain_e_per_adu, var, reference_variance=var)
    assert rms["full"] < rms["default"]
    # 11 frames and one reference: a loose factor, the bench measures it properly
    assert rms["full"] < 3.0 * bound.rms_px


def test_coverage_is_deterministic(movie: tuple[np.ndarray, np.ndarray]) -> None:
    frames, _ = movie
    a = estimate_shifts(frames[:4], coverage=0.6)
    b = estimate_shifts(frames[:4], coverage=0.6)
    assert np.array_equal(a, b)


def test_small_coverage_shrinks_the_regions(base: np.ndarray) -> None:
    default = Registrar(base)
    small = Registrar(base, coverage=0.02)
    assert small.region_size_px < default.region_size_px
    assert small.region_size_px >= 16


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan])
def test_coverage_out_of_range(base: np.ndarray, bad: float) -> None:
    with pytest.raises(ValueError, match="coverage"):
        Registrar(base, coverage=bad)


def test_frame_fit_bands_follow_the_coverage(base: np.ndarray) -> None:
    ref = base.astype(np.float32)
    fits = [FrameFit(ref, coverage=c, smooth_sigma_px=1.0) for c in (0.25, 0.5, 1.0)]
    fractions = [f.fraction for f in fits]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0, abs=0.2)


def test_frame_fit_ignores_debris(base: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    noise = CameraNoise(peak_photons=PEAK)
    ref = noise.expose(base, rng)
    clean = fourier_shift(base, 1.3, -0.7)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    blob = 2.0 * np.exp(-((yy - 60.0) ** 2 + (xx - 120.0) ** 2) / (2 * 12.0**2))
    frame = noise.expose(clean + blob, rng)
    est = Registrar(ref, coverage=1.0, max_shift_px=10).measure(frame)
    assert est.ok
    assert_allclose([est.dx_px, est.dy_px], [1.3, -0.7], atol=0.05)


def test_noise_model_follows_the_camera(base: np.ndarray) -> None:
    noise = CameraNoise(peak_photons=2000.0, background_photons=20.0)
    frame = noise.expose(base, np.random.default_rng(4)).astype(np.float32)
    model = estimate_noise(frame)
    # ADU variance = (ADU - offset) / gain + read² / gain²: slope 1 / 0.46
    assert model.alpha == pytest.approx(1 / noise.gain_e_per_adu, rel=0.35)


def test_float16_is_accepted(base: np.ndarray) -> None:
    ref = base.astype(np.float16)
    frame = fourier_shift(base, 2.4, -1.3).astype(np.float16)
    est = Registrar(ref, max_shift_px=10).measure(frame)
    assert est.ok
    assert_allclose([est.dx_px, est.dy_px], [2.4, -1.3], atol=0.05)
    assert ref.dtype == np.float16  # not converted in place


def test_reference_previous_chains_to_frame_zero(
    movie: tuple[np.ndarray, np.ndarray],
) -> None:
    frames, truth = movie
    est = list(iter_estimates(frames, reference="previous", max_shift_px=10))
    got = np.array([(e.dx_px, e.dy_px) for e in est])
    assert got[0].tolist() == [0.0, 0.0]
    # chained errors add up as a random walk: looser than against frame 0
    assert np.all(np.hypot(*(got - truth).T) < 0.15)
    assert all(e.ok for e in est)


def test_reference_choice_is_validated(movie: tuple[np.ndarray, np.ndarray]) -> None:
    frames, _ = movie
    with pytest.raises(ValueError, match="previous"):
        list(iter_estimates(frames, reference="last"))  # type: ignore[arg-type]


def test_coverage_for_interval() -> None:
    fast = coverage_for_interval((2048, 2048), 0.02)
    slow = coverage_for_interval((2048, 2048), 2.0)
    assert 0 < fast < slow <= 1.0
    assert coverage_for_interval((512, 512), 1.0) == 1.0
    tiny = coverage_for_interval((512, 512), 0.001)
    assert 0 < tiny < 0.25
    for c in (fast, slow, tiny):
        assert estimated_ms((2048, 2048), c) > 0
    # within budget by the cost model
    assert estimated_ms((2048, 2048), slow) <= 0.3 * 2000.0 + 1e-9
    with pytest.raises(ValueError, match="interval_s"):
        coverage_for_interval((512, 512), 0.0)
    with pytest.raises(ValueError, match="budget_fraction"):
        coverage_for_interval((512, 512), 1.0, budget_fraction=0.0)


def test_frame_fit_keeps_the_edge_tiles(base: np.ndarray) -> None:
    ref = base.astype(np.float32)
    fit = FrameFit(ref, coverage=1.0, smooth_sigma_px=1.0)
    # every pixel but a strip of the kernel's reach (+ slack) along the edge
    assert fit.fraction > 0.8
    small = fit.refine(fourier_shift(base, 2.4, -1.6).astype(np.float32), -1.6, 2.4)
    assert small is not None and small.n_valid == fit.n_ty * fit.n_tx
    assert_allclose([small.d_col, small.d_row], [2.4, -1.6], atol=0.01)
    # a larger drift loses the leading edge's tiles only, and is still right
    large = fit.refine(fourier_shift(base, 9.3, 0.4).astype(np.float32), 0.4, 9.3)
    assert large is not None and fit.n_ty * (fit.n_tx - 2) <= large.n_valid
    assert large.n_valid < fit.n_ty * fit.n_tx
    assert_allclose([large.d_col, large.d_row], [9.3, 0.4], atol=0.01)


def test_frame_fit_precision_over_many_noisy_pairs(base: np.ndarray) -> None:
    # a fresh noisy reference per pair: the bound averages over the reference's
    # noise too, so one shared reference would bias the comparison
    rng = np.random.default_rng(21)
    noise = CameraNoise(peak_photons=PEAK)
    shifted = fourier_shift(base, 0.37, -0.21)
    errors = []
    for _ in range(30):
        fit = FrameFit(noise.expose(base, rng), coverage=1.0, smooth_sigma_px=1.0)
        sol = fit.refine(noise.expose(shifted, rng), -0.21, 0.37, max_iter=6)
        assert sol is not None
        errors.append((sol.d_col - 0.37, sol.d_row + 0.21))
    rms = float(np.sqrt(np.mean(np.sum(np.square(errors), axis=1))))
    electrons = base * PEAK + noise.background_photons
    var = (electrons + noise.read_noise_e**2) / noise.gain_e_per_adu**2
    bound = shift_crlb(electrons / noise.gain_e_per_adu, var, reference_variance=var)
    print(f"frame fit: RMS {rms * 1e3:.2f} mpx = {rms / bound.rms_px:.2f}x the bound")
    assert rms < 1.8 * bound.rms_px


def test_frame_fit_stops_when_its_contraction_says_the_error_left_is_small(
    base: np.ndarray, movie: tuple[np.ndarray, np.ndarray]
) -> None:
    # after a few tracked frames the fit knows how fast it converges: a frame
    # starting near its answer is done in one resampling, where the fully
    # iterated fit lands
    frames, truth = movie
    fit = FrameFit(frames[0], coverage=1.0, smooth_sigma_px=1.0)
    for frame, (dx, dy) in zip(frames[1:8], truth[1:8], strict=True):
        assert fit.refine(frame, dy + 0.02, dx - 0.02) is not None
    assert fit.contraction < 0.1
    (dx, dy), frame = truth[9], frames[9]
    once = fit.refine(frame, dy + 0.01, dx - 0.01, max_iter=1)
    full = fit.refine(frame, dy + 0.01, dx - 0.01, max_iter=6)
    assert once is not None and full is not None
    assert once.converged
    assert math.hypot(once.d_row - full.d_row, once.d_col - full.d_col) < (
        0.1 * full.sigma_px
    )
    assert math.hypot(once.d_col - dx, once.d_row - dy) < 4 * full.sigma_px


def test_frame_fit_with_blank_tiles(base: np.ndarray) -> None:
    # a zeroed patch (a mask, a dead camera region) and flat background: those
    # tiles carry no information; the fit neither fails nor follows them
    ref = base.copy()
    ref[:96, :64] = 0.0
    ref[120:, 150:] = 0.4
    fit = FrameFit(ref.astype(np.float32), coverage=1.0, smooth_sigma_px=1.0)
    frame = fourier_shift(ref, 1.3, -0.6)
    frame[:96, :64] = 0.0  # the mask stays put on the camera
    sol = fit.refine(frame.astype(np.float32), -0.6, 1.3)
    assert sol is not None
    assert_allclose([sol.d_col, sol.d_row], [1.3, -0.6], atol=0.01)
    est = Registrar(ref, coverage=1.0, max_shift_px=10).measure(frame)
    assert est.ok
    assert_allclose([est.dx_px, est.dy_px], [1.3, -0.6], atol=0.02)


def test_frame_fit_measures_the_noise_its_model_missed(base: np.ndarray) -> None:
    # a noise model 3x too high (what the single-image estimate gives on sharp
    # spots): the residuals of the fitted frames measure the real noise, and
    # the bias compensation follows it
    camera = CameraNoise(peak_photons=PEAK)
    g = camera.gain_e_per_adu
    alpha = 1.0 / g
    beta = (camera.read_noise_e / g) ** 2 - camera.offset_adu / g
    rng = np.random.default_rng(8)
    ref = camera.expose(base, rng).astype(np.float32)
    fits = {
        k: FrameFit(
            ref,
            coverage=1.0,
            smooth_sigma_px=1.0,
            noise=NoiseModel(k * alpha, k * beta, k * (camera.read_noise_e / g) ** 2),
        )
        for k in (1.0, 3.0)
    }
    for dx, dy in [(0.4, -0.3), (1.1, 0.2), (-0.6, 0.9), (0.2, 0.5)]:
        frame = camera.expose(fourier_shift(base, dx, dy), rng)
        sols = [fit.refine(frame, dy, dx) for fit in fits.values()]
        assert sols[0] is not None and sols[1] is not None
    assert fits[1.0].noise_scale == pytest.approx(1.0, abs=0.1)
    assert fits[3.0].noise_scale == pytest.approx(1.0 / 3.0, rel=0.1)
    # the same fixed point as with the right model, well inside the noise
    assert abs(sols[1].d_col - sols[0].d_col) < 0.1 * sols[0].sigma_px
    assert abs(sols[1].d_row - sols[0].d_row) < 0.1 * sols[0].sigma_px


def _spots(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """Sparse diffraction-limited spots on a dark field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape)
    for y, x in rng.uniform(8, shape[0] - 8, (n, 2)):
        img += np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.3**2))
    return img / img.max()


def test_frame_fit_learns_the_camera_from_the_first_frame() -> None:
    # the residuals of the first fitted frame give the camera's own model
    camera = CameraNoise(peak_photons=5000.0)
    base = _spots((256, 256), 60, seed=3)
    rng = np.random.default_rng(5)
    ref = camera.expose(base, rng).astype(np.float32)
    fit = FrameFit(ref, coverage=1.0, smooth_sigma_px=1.0)
    sol = fit.refine(camera.expose(fourier_shift(base, 0.7, -0.4), rng), -0.4, 0.7)
    assert sol is not None
    assert_allclose([sol.d_col, sol.d_row], [0.7, -0.4], atol=0.01)
    g = camera.gain_e_per_adu
    # the slope reads low at the brightest pixels, whose level is noisy too
    assert fit.noise.alpha == pytest.approx(1.0 / g, rel=0.35)
    background_adu = np.array([camera.offset_adu + camera.background_photons * g])
    true_var = (camera.background_photons + camera.read_noise_e**2) / g**2
    learnt = fit.noise.variance(background_adu.astype(np.float32))[0]
    assert learnt == pytest.approx(true_var, rel=0.5)


def test_frame_fit_keeps_a_given_noise_model(base: np.ndarray) -> None:
    camera = CameraNoise(peak_photons=PEAK)
    rng = np.random.default_rng(6)
    given = NoiseModel(3.0, 10.0, 5.0)
    fit = FrameFit(
        camera.expose(base, rng).astype(np.float32),
        coverage=1.0,
        smooth_sigma_px=1.0,
        noise=given,
    )
    assert fit.refine(camera.expose(fourier_shift(base, 0.5, 0.2), rng), 0.2, 0.5)
    assert fit.noise == given


def test_frame_fit_against_its_own_reference_keeps_the_estimate(
    base: np.ndarray,
) -> None:
    # zero residuals say nothing about the noise
    ref = CameraNoise(peak_photons=PEAK).expose(base, np.random.default_rng(7))
    fit = FrameFit(ref.astype(np.float32), coverage=1.0, smooth_sigma_px=1.0)
    assert fit.refine(ref, 0.0, 0.0) is not None
    assert fit.noise == estimate_noise(ref.astype(np.float32))
