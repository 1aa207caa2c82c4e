"""The integer search: coarse to fine, on the grid it should sample."""

from __future__ import annotations

import numpy as np
import pytest

from stagelock.registration._match import match_in_window
from stagelock.sim import fourier_shift

from ._corpus import lattice


@pytest.mark.parametrize("row", [90, 91, 92, 93])
def test_coarse_grid_samples_the_expected_displacement(row: int) -> None:
    # a sharp periodic sample: half a coarse pixel off the expected
    # displacement, a wrong lattice site that falls on the reduced grid
    # correlates better than the right one
    base = lattice(size=256, period=9.0, seed=3)
    base = (base / base.max()).astype(np.float32)
    frame = fourier_shift(base, -0.4, 0.3).astype(np.float32)
    size, scale = 64, 4
    template = base[row : row + size, 100 : 100 + size]
    match = match_in_window(
        frame, template, row, 100, centre_row=0, centre_col=0,
        radius_px=50, scale=scale,
    )  # fmt: skip
    assert match is not None
    assert abs(match.d_row - 0.3) <= scale / 2 and abs(match.d_col + 0.4) <= scale / 2
    assert match.ncc > 0.8
