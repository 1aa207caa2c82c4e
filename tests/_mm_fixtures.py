"""Shared helpers for the Micro-Manager tests (a plain module, not a conftest).

Test modules define their fixtures as thin wrappers around the generators here
(``yield from scope_factory()``), which keeps ruff's F811 quiet.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest

from stagelock.sim import SimulatedMicroscope
from stagelock.sources import release_core

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

# a quiet, drift-free microscope: tests add what they need
STILL: dict[str, Any] = {
    "shape_px": [256, 256],
    "pixel_size_um": 0.5,
    "exposure_ms": 5.0,
    "creep_um_per_s": [0.0, 0.0],
    "random_walk_um_per_sqrt_s": 0.0,
    "stage_speed_um_per_s": 1000.0,
    "stage_settle_ms": 5.0,
    "peak_photons": 2000.0,
}


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until true; fail (never hang) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.002)


def scope_factory() -> Iterator[Callable[..., SimulatedMicroscope]]:
    """Factory of simulated microscopes, released at teardown."""
    scopes: list[SimulatedMicroscope] = []

    def make(
        settings: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> SimulatedMicroscope:
        merged = {**STILL, **(settings or {})}
        scope = SimulatedMicroscope(merged, **kwargs)
        scopes.append(scope)
        return scope

    yield make
    for scope in scopes:
        release_core(scope.core)
    scopes.clear()


def snap(scope: SimulatedMicroscope) -> Any:
    """Snap one frame after the stage has settled."""
    scope.core.waitForDevice("XYStage")
    scope.core.snapImage()
    return scope.core.getImage()
