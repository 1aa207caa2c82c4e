"""Choosing where to cut template regions from the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["Region", "select_regions"]


@dataclass(frozen=True, slots=True)
class Region:
    """A square template region of the reference, in frame coordinates.

    Attributes
    ----------
    row, col : int
        Top-left corner (row = y, col = x).
    size_px : int
        Side length.
    score : float
        Texture score (smallest eigenvalue of the structure tensor).
    """

    row: int
    col: int
    size_px: int
    score: float


def select_regions(
    reference: npt.NDArray[np.float32],
    *,
    n_regions: int,
    size_px: int,
    roi: tuple[int, int, int, int] | None = None,
    min_relative_score: float = 0.02,
) -> list[Region]:
    """Pick up to ``n_regions`` non-overlapping, well-textured square regions.

    Parameters
    ----------
    reference : ndarray of float32, shape (H, W)
        The reference image.
    n_regions : int
        Maximum number of regions.
    size_px : int
        Side of each square region.
    roi : (x, y, w, h), optional
        Only place regions inside this rectangle (frame pixels).
    min_relative_score : float
        Regions scoring below this fraction of the best region are dropped
        (at least one region is always kept).

    Returns
    -------
    list of Region
        Best first.

    Notes
    -----
    The score of a window is the smaller eigenvalue of its summed structure tensor
    (Shi & Tomasi [1]_). That eigenvalue is what the Gauss-Newton refinement inverts,
    so a high score means the window pins down *both* x and y, and a flat or purely
    one-directional (edge) window is avoided. The tensor is computed on a reduced
    copy of large images, which only shifts the placement by a few pixels.

    References
    ----------
    .. [1] J. Shi and C. Tomasi, "Good features to track", CVPR 1994,
       :doi:`10.1109/CVPR.1994.323794`.
    """
    height, width = reference.shape
    x0, y0, w, h = roi if roi is not None else (0, 0, width, height)
    size_px = min(size_px, w, h)
    # Work at a scale where the window is ~24-48 px: plenty for a texture score.
    scale = max(1, size_px // 32)
    small: npt.NDArray[Any] = reference[y0 : y0 + h, x0 : x0 + w]
    if scale > 1:
        small = cv2.resize(
            small, (w // scale, h // scale), interpolation=cv2.INTER_AREA
        )
    small = cv2.GaussianBlur(small, (0, 0), 1.0)
    win = max(1, size_px // scale)
    # OpenCV's fused min-eigenvalue map, centred on the window: the value at
    # (r + win // 2, c + win // 2) describes the window starting at (r, c). Its
    # Sobel scale 1 / (4 win) makes it 1/16 of the mean structure tensor's
    # eigenvalue; the score keeps that unit. One call instead of a dozen
    # memory-bound whole-image passes (4.0 -> 3.4 ms at 512², same regions).
    valid_rows = small.shape[0] - win + 1
    valid_cols = small.shape[1] - win + 1
    if valid_rows < 1 or valid_cols < 1:
        return [Region(y0, x0, size_px, 0.0)]
    eig = cv2.cornerMinEigenVal(small, win, ksize=3)
    half = win // 2
    # float32 throughout: argmax of the exact values, no float64 copy
    score = 16.0 * eig[half : half + valid_rows, half : half + valid_cols]

    regions: list[Region] = []
    best = -np.inf
    for _ in range(n_regions):
        idx = int(np.argmax(score))
        r, c = divmod(idx, score.shape[1])
        value = float(score[r, c])
        if not np.isfinite(value) or value == -np.inf:
            break
        if regions and value < min_relative_score * best:
            break
        best = max(best, value)
        row = min(y0 + r * scale, y0 + h - size_px)
        col = min(x0 + c * scale, x0 + w - size_px)
        regions.append(Region(row, col, size_px, value))
        # no overlap: suppress every window start within one window of this one
        r_lo, r_hi = max(0, r - win + 1), r + win
        c_lo, c_hi = max(0, c - win + 1), c + win
        score[r_lo:r_hi, c_lo:c_hi] = -np.inf
    return regions
