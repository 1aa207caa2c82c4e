"""Streaming adapter for ``../shared/bench/run_peers.py --extra-stream``.

``prepare(reference) -> step``, ``step(frame) -> (dx, dy)``: the live path, one
:class:`stagelock.Registrar` per movie, timed per frame by the harness.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import stagelock


def prepare(reference: np.ndarray) -> Callable[[np.ndarray], tuple[float, float]]:
    registrar = stagelock.Registrar(reference, max_shift_px=50)

    def step(frame: np.ndarray) -> tuple[float, float]:
        est = registrar.measure(frame)
        return est.dx_px, est.dy_px

    return step


prepare.threaded = True  # type: ignore[attr-defined]
prepare.version = stagelock.__version__  # type: ignore[attr-defined]
