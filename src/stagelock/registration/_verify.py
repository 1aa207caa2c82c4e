"""An independent check of a found shift: does the rest of the overlap agree."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["OVERVIEW_PX", "better_alternative", "overlap_agreement", "overview"]

OVERVIEW_PX = 96
"""Short side of the reduced copies the check works on."""


def overview_factor(shape: tuple[int, ...]) -> int:
    """Reduction factor that brings the short side to about ``OVERVIEW_PX``."""
    return max(1, min(shape[0], shape[1]) // OVERVIEW_PX)


def overview(image: npt.NDArray[Any], factor: int) -> npt.NDArray[np.float32]:
    """Area-averaged copy of ``image`` reduced by ``factor`` (noise drops by it)."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    crop: npt.NDArray[np.float32] = np.asarray(
        image[: h * factor, : w * factor], dtype=np.float32
    )
    if factor == 1:
        return crop
    return np.asarray(
        cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA), dtype=np.float32
    )


def overlap_agreement(
    ref_small: npt.NDArray[np.float32],
    frame_small: npt.NDArray[np.float32],
    d_row: float,
    d_col: float,
    factor: int,
    *,
    grid: int = 4,
) -> float:
    """Texture-weighted median correlation of the overlap's tiles at a shift.

    Parameters
    ----------
    ref_small, frame_small : ndarray of float32
        Reduced reference and frame (:func:`overview`).
    d_row, d_col : float
        The shift to check (full-resolution px).
    factor : int
        The reduction factor of the copies.
    grid : int
        The overlap is cut into ``grid`` x ``grid`` tiles.

    Returns
    -------
    float
        Median over the tiles of their normalised correlation, each tile
        weighted by its texture (variance) in the reference; tiles flat in the
        frame (zeroed, masked, a closed shutter's part) are left out. NaN when
        the overlap is too small to check (< 6 x 6 reduced px) or no tile has
        texture.

    Notes
    -----
    The template regions can agree on a wrong shift when they are few (a small
    overlap) or see a repeated motif; the rest of the overlap then does not
    match. Averaging ``factor²`` pixels divides the noise by ``factor``, so a
    right shift correlates well (> 0.6 on 50-photon frames) even where the
    regions' full-resolution correlation is poor, and a wrong one correlates
    near zero. The median over tiles ignores debris and masked tiles.
    """
    sy, sx = round(d_row / factor), round(d_col / factor)
    h, w = ref_small.shape
    r0, r1 = max(0, -sy), min(h, h - sy)
    c0, c1 = max(0, -sx), min(w, w - sx)
    if r1 - r0 < 6 or c1 - c0 < 6:
        return math.nan
    a = ref_small[r0:r1, c0:c1]
    b = frame_small[r0 + sy : r1 + sy, c0 + sx : c1 + sx]
    n_r = max(1, min(grid, (r1 - r0) // 6))
    n_c = max(1, min(grid, (c1 - c0) // 6))
    rows = np.linspace(0, r1 - r0, n_r + 1).astype(int)
    cols = np.linspace(0, c1 - c0, n_c + 1).astype(int)
    nccs, weights = [], []
    scale = float(np.var(a)) + 1e-30
    for i in range(n_r):
        for j in range(n_c):
            ta = a[rows[i] : rows[i + 1], cols[j] : cols[j + 1]].astype(np.float64)
            tb = b[rows[i] : rows[i + 1], cols[j] : cols[j + 1]].astype(np.float64)
            ta, tb = ta - ta.mean(), tb - tb.mean()
            va, vb = float(np.mean(ta * ta)), float(np.mean(tb * tb))
            if va <= 1e-6 * scale or vb <= 1e-6 * scale:
                continue  # flat in either image: nothing to compare
            nccs.append(float(np.mean(ta * tb)) / math.sqrt(va * vb))
            weights.append(va)
    if not nccs:
        return math.nan
    order = np.argsort(nccs)
    cum = np.cumsum(np.asarray(weights)[order])
    k = int(np.searchsorted(cum, 0.5 * cum[-1]))
    return float(np.asarray(nccs)[order][k])


def better_alternative(
    ref_small: npt.NDArray[np.float32],
    frame_small: npt.NDArray[np.float32],
    d_row: float,
    d_col: float,
    factor: int,
    max_shift_px: float,
    *,
    found_agreement: float | None = None,
    n_candidates: int = 3,
) -> tuple[float, float] | None:
    """Another shift the whole overlap agrees with at least as well, if any.

    A repeated motif (a lattice, a grating) matches itself one period away
    almost everywhere; only its defects (vacancies, debris) tell the periods
    apart. Regions too small to hold a defect can then agree on the wrong
    period, and so does :func:`overlap_agreement` at that shift. This looks
    for the best other peaks of the reduced copies' normalised correlation
    within the capture range and scores each by :func:`overlap_agreement`.

    Parameters
    ----------
    ref_small, frame_small : ndarray of float32
        Reduced reference and frame (:func:`overview`).
    d_row, d_col : float
        The shift found (full-resolution px).
    factor : int
        The reduction factor of the copies.
    max_shift_px : float
        The capture range (full-resolution px, per axis).
    found_agreement : float, optional
        :func:`overlap_agreement` at the shift found, when the caller has it.
    n_candidates : int
        How many of the correlation's other peaks are scored.

    Returns
    -------
    (d_row, d_col) or None
        The best-agreeing other shift (full-resolution px, to the reduced
        copies' pixel) when it agrees at least as well as the one found, else
        None (also when the copies are too small to search).
    """
    h, w = ref_small.shape
    radius = min(math.ceil(max_shift_px / factor) + 1, min(h, w) // 4)
    if radius < 2 or frame_small.shape != ref_small.shape:
        return None
    template = np.ascontiguousarray(
        frame_small[radius : h - radius, radius : w - radius]
    )
    if float(np.var(template)) <= 0.0:
        return None
    score = cv2.matchTemplate(
        np.ascontiguousarray(ref_small), template, cv2.TM_CCOEFF_NORMED
    )
    score = np.nan_to_num(score, nan=-1.0)
    peaks = (score >= cv2.dilate(score, np.ones((3, 3), np.uint8))) & (score > 0)
    rows, cols = np.nonzero(peaks)
    # template row r sits at reference row r + i - radius: the frame's content
    # is displaced by radius - i
    shifts = np.stack([radius - rows, radius - cols], axis=1).astype(np.float64)
    far = np.hypot(shifts[:, 0] - d_row / factor, shifts[:, 1] - d_col / factor) > 1.5
    inside = np.all(np.abs(shifts * factor) <= max_shift_px + factor, axis=1)
    keep = np.flatnonzero(far & inside)
    if keep.size == 0:
        return None
    order = keep[np.argsort(-score[rows[keep], cols[keep]], kind="stable")]
    found = (
        overlap_agreement(ref_small, frame_small, d_row, d_col, factor)
        if found_agreement is None
        else found_agreement
    )
    best: tuple[float, float] | None = None
    best_agreement = found if math.isfinite(found) else -math.inf
    for k in order[:n_candidates]:
        alt = (float(shifts[k, 0]) * factor, float(shifts[k, 1]) * factor)
        agreement = overlap_agreement(ref_small, frame_small, *alt, factor)
        if agreement >= best_agreement:
            best, best_agreement = alt, agreement
    return best
