"""Choosing the coverage from the time a measurement may take."""

from __future__ import annotations

import math

__all__ = ["coverage_for_interval", "estimated_ms"]

REGION_MS = 2.0
"""Cost of the region engine per frame at its default size (tracking), ms."""

FRAME_NS_PER_PIXEL = 40.0
"""Cost of the whole-frame fit per covered pixel and frame (about two
resamplings), ns, one thread; measured with ``bench/registration.py`` on the
project's 2-core machine."""


def _region_share(shape: tuple[int, int], n_regions: int) -> float:
    # the default region side of the Registrar: ~1/6 of the short side, 16..128 px
    side = min(128, max(16, round(min(shape) / 6 / 8) * 8))
    return min(1.0, n_regions * side * side / float(shape[0] * shape[1]))


def estimated_ms(
    frame_shape: tuple[int, int], coverage: float, *, n_regions: int = 9
) -> float:
    """Predicted time per tracked frame (ms, one thread) at this coverage.

    Parameters
    ----------
    frame_shape : (rows, cols)
    coverage : float
        As for :class:`~stagelock.registration.Registrar`.
    n_regions : int
        The Registrar's ``n_regions``.

    Returns
    -------
    float
        A fixed cost model (no clock is read): the regions' time scaled by
        their pixels, plus the whole-frame fit's per-pixel cost above their
        share.
    """
    share = _region_share(frame_shape, n_regions)
    pixels = frame_shape[0] * frame_shape[1]
    if coverage <= share:
        return REGION_MS * max(coverage / share, 0.25)
    return REGION_MS + FRAME_NS_PER_PIXEL * 1e-6 * coverage * pixels


def coverage_for_interval(
    frame_shape: tuple[int, int],
    interval_s: float,
    *,
    budget_fraction: float = 0.3,
    n_regions: int = 9,
) -> float:
    """Largest coverage whose measurement fits in a share of the frame interval.

    Parameters
    ----------
    frame_shape : (rows, cols)
        Shape of the camera frames.
    interval_s : float
        Time between frames, s (> 0).
    budget_fraction : float
        Share of the interval the measurement may take (0 < f <= 1); 0.3 leaves
        the rest to acquisition, publishing and the stage.
    n_regions : int
        The Registrar's ``n_regions``.

    Returns
    -------
    float
        A coverage in (0, 1] for :class:`~stagelock.registration.Registrar`:
        1.0 when the whole frame fits in the budget, never below 1 % of what
        the regions cover. Deterministic: from the shape and interval only, by
        the cost model of :func:`estimated_ms` (no timing at run time, so the
        same settings give the same shifts on any machine).

    Raises
    ------
    ValueError
        If ``interval_s`` or ``budget_fraction`` is out of range.

    Examples
    --------
    >>> coverage_for_interval((2048, 2048), 0.02)  # 50 fps: regions only
    0.035...
    >>> coverage_for_interval((512, 512), 1.0)  # 1 fps: the whole frame
    1.0
    """
    if not interval_s > 0 or not math.isfinite(interval_s):
        raise ValueError(f"interval_s must be a positive number; got {interval_s}")
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"budget_fraction must be in (0, 1]; got {budget_fraction}")
    budget_ms = budget_fraction * interval_s * 1e3
    share = _region_share(frame_shape, n_regions)
    if budget_ms <= REGION_MS:
        # shrink the regions: their cost grows with their pixels
        return max(0.01 * share, min(share, share * budget_ms / REGION_MS))
    pixels = frame_shape[0] * frame_shape[1]
    coverage = (budget_ms - REGION_MS) / (FRAME_NS_PER_PIXEL * 1e-6 * pixels)
    if coverage <= share:
        return share
    return float(min(1.0, coverage))
