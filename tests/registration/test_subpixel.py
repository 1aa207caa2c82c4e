from __future__ import annotations

import pytest

from stagelock.registration._subpixel import learn_step_efficiency


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
