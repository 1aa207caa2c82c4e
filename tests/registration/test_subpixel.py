from __future__ import annotations

import cv2
import numpy as np
import pytest

from stagelock.registration._subpixel import (
    BANDLIMITED_HALF,
    RegionStack,
    bandlimited_response,
    bandlimited_shift_kernel,
    error_left_px,
    learn_contraction,
    learn_step_efficiency,
)


def test_step_efficiency_is_learnt_from_a_halving_step() -> None:
    # a plain step half the previous one (applied at gain 1) means η = 0.5
    eta = 1.0
    for _ in range(20):
        eta = learn_step_efficiency(eta, (0.25, 0.0), (0.5, 0.0, 1.0), 0.001)
    assert eta == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("step", "previous", "sigma_px"),
    [
        ((0.1, 0.0), None, 0.001),  # no previous step
        ((0.0005, 0.0), (0.001, 0.0, 1.0), 0.001),  # steps below the noise
        ((1.0, 0.0), (0.5, 0.0, 1.0), 0.001),  # diverging: η would be < 0.2
    ],
)
def test_step_efficiency_ignores_steps_that_say_nothing(
    step: tuple[float, float],
    previous: tuple[float, float, float] | None,
    sigma_px: float,
) -> None:
    assert learn_step_efficiency(0.8, step, previous, sigma_px) == 0.8


def test_contraction_jumps_up_at_once_and_decays_by_half() -> None:
    assert learn_contraction(1.0, 0.01, 1.0) == 0.5  # fast: halve, no more
    assert learn_contraction(0.02, 0.3, 1.0) == 0.3  # slower: at once
    assert learn_contraction(0.5, 2.0, 1.0) == 1.0  # diverging: capped at 1
    assert learn_contraction(0.3, 0.1, 0.0) == 0.3  # no previous move


def test_error_left_is_the_geometric_tail_of_the_moves() -> None:
    assert error_left_px(0.1, 0.2) == pytest.approx(0.025)
    assert error_left_px(0.1, 0.5) == 0.1  # slow contraction: no credit
    assert error_left_px(0.1, 1.0) == 0.1


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.5, 0.9])
def test_bandlimited_kernel_shifts_and_blurs_inside_the_band(frac: float) -> None:
    # its frequency response against the designed one (exp(-2 pi^2 sigma^2 k^2),
    # tapered to zero at Nyquist) times the shift's phase ramp: the phase (a
    # shift error) matters most
    sigma = 0.5
    kernel = bandlimited_shift_kernel(frac, sigma)
    assert kernel.shape == (2 * BANDLIMITED_HALF + 2,)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    taps = np.arange(-BANDLIMITED_HALF, BANDLIMITED_HALF + 2)
    for k in (0.05, 0.2, 0.3, 0.4):
        response = np.sum(kernel * np.exp(2j * np.pi * k * taps))
        designed = float(bandlimited_response(k, sigma))
        ideal = designed * np.exp(2j * np.pi * k * frac)
        shift_error_px = np.angle(response / ideal) / (2 * np.pi * k)
        assert abs(shift_error_px) < 0.002
        assert abs(abs(response) - designed) < 0.02
    # the taper: a Gaussian below, nothing left at Nyquist
    assert float(bandlimited_response(0.3, sigma)) == pytest.approx(
        np.exp(-2 * np.pi**2 * sigma**2 * 0.09)
    )
    assert float(bandlimited_response(0.5, sigma)) == pytest.approx(0.0, abs=1e-12)


def test_signal_share_is_the_signal_fraction_of_the_gradient_energy() -> None:
    rng = np.random.default_rng(5)
    texture = cv2.GaussianBlur(rng.normal(0.0, 1.0, (96, 96)), (0, 0), 3.0)
    texture = (100.0 * texture / texture.std()).astype(np.float32)
    corners = [(20, 20), (20, 50), (50, 35)]
    grad_rms = float(np.sqrt(np.mean(np.square(np.gradient(texture)))))
    noisy = texture + rng.normal(0.0, grad_rms, texture.shape).astype(np.float32)
    pure_noise = rng.normal(0.0, 10.0, texture.shape).astype(np.float32)
    assert RegionStack(texture, corners, 24, 0.0).signal_share > 0.98
    assert RegionStack(pure_noise, corners, 24, 0.0).signal_share < 0.05
    # white noise of the gradient's rms: a central difference passes half of
    # its variance per axis, so the share is 1 / (1 + 0.5)
    unblurred = RegionStack(noisy, corners, 24, 0.0).signal_share
    assert abs(unblurred - 2.0 / 3.0) < 0.05
    # a 1 px blur removes most of that noise and little of the smooth texture
    assert RegionStack(noisy, corners, 24, 1.0).signal_share > 0.9
