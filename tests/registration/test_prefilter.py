"""The whole-frame fit's pre-filter, chosen from the reference's spectrum."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from numpy.testing import assert_allclose

from stagelock.registration._fullframe import FrameFit, NoiseModel
from stagelock.registration._prefilter import predicted_variance, prefilter_sigma
from stagelock.sim import CameraNoise, fourier_shift, sample_image


def _camera_model(camera: CameraNoise) -> NoiseModel:
    g = camera.gain_e_per_adu
    return NoiseModel(
        1.0 / g,
        (camera.read_noise_e / g) ** 2 - camera.offset_adu / g,
        (camera.background_photons + camera.read_noise_e**2) / g**2,
    )


def _smooth_cells(shape: tuple[int, int]) -> np.ndarray:
    """Large, soft-edged blobs: the energy sits at low spatial frequencies."""
    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur(rng.random(shape), (0, 0), 12.0)
    return (img - img.min()) / np.ptp(img)


def test_bright_sharp_content_wants_little_blur() -> None:
    camera = CameraNoise(peak_photons=5000.0)
    ref = camera.expose(sample_image((256, 256)), np.random.default_rng(1))
    assert prefilter_sigma(ref, _camera_model(camera)) == 0.5


def test_faint_smooth_content_wants_more_blur() -> None:
    camera = CameraNoise(peak_photons=50.0)
    ref = camera.expose(_smooth_cells((256, 256)), np.random.default_rng(1))
    variances = predicted_variance(ref, _camera_model(camera))
    # the blur's loss of signal matters less than the noise it removes
    assert variances[2.0] < variances[1.0] < variances[0.75]
    assert prefilter_sigma(ref, _camera_model(camera)) >= 1.5


def test_no_texture_keeps_the_default() -> None:
    flat = np.full((128, 128), 100.0)
    assert prefilter_sigma(flat, NoiseModel(1.0, 1.0, 1.0)) == 1.0


def _fit_errors(
    base: np.ndarray, camera: CameraNoise, sigma: float | Literal["auto"], n_frames: int
) -> tuple[FrameFit, np.ndarray]:
    rng = np.random.default_rng(3)
    fit = FrameFit(
        camera.expose(base, rng).astype(np.float32),
        coverage=1.0,
        smooth_sigma_px=sigma,
    )
    errors = []
    for _ in range(n_frames):
        dx, dy = rng.uniform(-1.0, 1.0, 2)
        sol = fit.refine(camera.expose(fourier_shift(base, dx, dy), rng), dy, dx)
        assert sol is not None
        errors.append((sol.d_col - dx, sol.d_row - dy))
    return fit, np.array(errors)


def test_frame_fit_auto_sharpens_on_a_bright_sample() -> None:
    camera = CameraNoise(peak_photons=5000.0)
    fit = FrameFit(
        camera.expose(sample_image((256, 256)), np.random.default_rng(0)).astype(
            np.float32
        ),
        coverage=1.0,
        smooth_sigma_px="auto",
    )
    assert fit.sigma == 1.0  # until the first frame has measured the noise
    fit, errors = _fit_errors(sample_image((256, 256)), camera, "auto", 4)
    assert fit.sigma == 0.5
    assert_allclose(errors, 0.0, atol=0.01)


def test_frame_fit_auto_blurs_faint_smooth_content_and_gains() -> None:
    camera = CameraNoise(peak_photons=50.0)
    base = _smooth_cells((256, 256))
    auto, auto_err = _fit_errors(base, camera, "auto", 20)
    fixed, fixed_err = _fit_errors(base, camera, 1.0, 20)
    assert (auto.sigma, fixed.sigma) == (2.0, 1.0)
    rms_auto, rms_fixed = (float(np.sqrt(np.mean(e**2))) for e in (auto_err, fixed_err))
    # same frames, same reference: the noise the blur removes outweighs the
    # signal it loses (0.050 vs 0.074 px on this draw)
    assert rms_auto < 0.8 * rms_fixed


def test_frame_fit_auto_with_a_given_model_chooses_at_once() -> None:
    camera = CameraNoise(peak_photons=5000.0)
    ref = camera.expose(sample_image((256, 256)), np.random.default_rng(0))
    fit = FrameFit(
        ref.astype(np.float32),
        coverage=1.0,
        smooth_sigma_px="auto",
        noise=_camera_model(camera),
    )
    assert fit.sigma == prefilter_sigma(ref, _camera_model(camera)) == 0.5
