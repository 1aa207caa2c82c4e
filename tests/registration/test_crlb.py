"""The Cramér-Rao bound: closed form on a Gaussian spot, and a Monte-Carlo check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from stagelock.registration import camera_variance, shift_crlb

SIZE = 64
Y, X = np.mgrid[:SIZE, :SIZE].astype(np.float64)


def spot(dx: float = 0.0, dy: float = 0.0, amp: float = 200.0, s: float = 2.5):
    r2 = (X - 31.3 - dx) ** 2 + (Y - 32.2 - dy) ** 2
    return amp * np.exp(-r2 / (2 * s * s)) + 10.0


def test_gaussian_spot_matches_the_closed_form() -> None:
    # white noise v, spot A exp(-r²/2s²): F = A² π / (2 v) per axis, whatever s
    amp, v = 200.0, 25.0
    bound = shift_crlb(spot(amp=amp), v)
    expected = math.sqrt(2 * v / (amp**2 * math.pi))
    assert_allclose([bound.sigma_x_px, bound.sigma_y_px], expected, rtol=1e-3)
    assert_allclose(bound.rms_px, math.sqrt(2) * expected, rtol=1e-3)
    # a noisy reference with the same noise doubles the variance
    both = shift_crlb(spot(amp=amp), v, reference_variance=v)
    assert_allclose(both.sigma_x_px, math.sqrt(2) * expected, rtol=1e-3)


def _lucas_kanade(frame: np.ndarray) -> tuple[float, float]:
    """Gauss-Newton on the exact (analytic) model: an efficient estimator."""
    dx = dy = 0.0
    for _ in range(3):
        m = spot(dx, dy)
        g = (m - 10.0) / (2.5**2)
        jac = np.stack([(g * (X - 31.3 - dx)).ravel(), (g * (Y - 32.2 - dy)).ravel()])
        step = np.linalg.solve(jac @ jac.T, jac @ (frame - m).ravel())
        dx, dy = dx + step[0], dy + step[1]
    return dx, dy


def test_monte_carlo_reaches_the_bound() -> None:
    rng = np.random.default_rng(3)
    truth = (0.3, -0.2)
    clean = spot(*truth)
    v = 25.0
    est = np.array(
        [
            _lucas_kanade(clean + rng.normal(0.0, math.sqrt(v), clean.shape))
            for _ in range(300)
        ]
    )
    bound = shift_crlb(clean, v)
    sd = est.std(axis=0)
    # 300 trials: the sample sd is within ~10 % of the true one
    assert_allclose(sd, [bound.sigma_x_px, bound.sigma_y_px], rtol=0.15)
    assert_allclose(est.mean(axis=0), truth, atol=3 * bound.sigma_x_px / 10)


def test_mask_and_camera_variance() -> None:
    electrons = spot()
    var = camera_variance(electrons, read_noise_e=1.6, gain_e_per_adu=1.0)
    assert_allclose(var, electrons + 1.6**2)
    full = shift_crlb(electrons, var)
    half = np.zeros(electrons.shape, bool)
    half[:, :32] = True
    part = shift_crlb(electrons, var, mask=half)
    assert part.rms_px > full.rms_px
    flat = shift_crlb(np.full((32, 32), 5.0), 1.0)
    assert math.isinf(flat.rms_px)
    with pytest.raises(ValueError, match="variance"):
        shift_crlb(electrons, 0.0)
