"""Integer-pixel normalised cross-correlation search, coarse to fine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["IntegerMatch", "match_in_window", "parabola_offset"]


@dataclass(frozen=True, slots=True)
class IntegerMatch:
    """Best integer displacement of a template within a search window.

    Attributes
    ----------
    d_row, d_col : float
        Displacement of the template's content in the frame (px; sub-pixel only
        through a 3-point parabola, used as a starting point, never as a result).
    ncc : float
        Peak of the TM_CCOEFF_NORMED surface.
    at_edge : bool
        Whether the peak lies on the border of the searched displacements, i.e.
        the true peak may lie outside the window.
    """

    d_row: float
    d_col: float
    ncc: float
    at_edge: bool


def parabola_offset(left: float, centre: float, right: float) -> float:
    """Vertex of the parabola through three equally spaced samples, in (-0.5, 0.5)."""
    denom = left - 2.0 * centre + right
    if denom >= 0.0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5))


def match_in_window(
    frame: npt.NDArray[np.generic],
    template: npt.NDArray[np.float32],
    row: int,
    col: int,
    *,
    centre_row: int,
    centre_col: int,
    radius_px: int,
    scale: int = 1,
    template_small: npt.NDArray[Any] | None = None,
    prior: tuple[float, float] | None = None,
    tie_tolerance: float = 0.0,
) -> IntegerMatch | None:
    """Search displacements ``centre ± radius_px`` of a template cut at (row, col).

    Parameters
    ----------
    frame : ndarray, shape (H, W)
        Frame to search (any real dtype; only the window is converted).
    template : ndarray of float32, shape (s, s)
        Template at full resolution.
    row, col : int
        Where the template sits in the reference.
    centre_row, centre_col : int
        Displacement at the centre of the search.
    radius_px : int
        Half-width of the searched displacements (full-resolution pixels).
    scale : int
        Match on images reduced by this factor (area averaging): the coarse level
        of a coarse-to-fine search. The result is in full-resolution pixels.
    template_small : ndarray, optional
        The template already reduced by ``scale``.
    prior : (d_row, d_col), optional
        Displacement expected (e.g. the last one measured). Among correlation
        values within ``tie_tolerance`` of the maximum, the one closest to the
        prior wins: on periodic samples several lattice sites match almost
        equally well, and the drift is continuous.
    tie_tolerance : float
        Correlation difference treated as a tie.

    Returns
    -------
    IntegerMatch or None
        None when the window has no room for the template inside the frame.

    Notes
    -----
    TM_CCOEFF_NORMED subtracts the local means and divides by the local energies
    (Lewis [1]_), so the peak is insensitive to bleaching and offsets.

    References
    ----------
    .. [1] J. P. Lewis, "Fast normalized cross-correlation", Vision Interface
       1995, 120-123.
    """
    height, width = frame.shape
    size = template.shape[0]
    # the window starts a whole number of coarse pixels before the centre, so
    # the coarse grid samples the centre displacement exactly: half a coarse
    # pixel off, a sharp periodic sample correlates better at a wrong lattice
    # site that happens to fall on the grid than at the right one
    r0 = (
        row
        + centre_row
        - scale * min(math.ceil(radius_px / scale), (row + centre_row) // scale)
    )
    c0 = (
        col
        + centre_col
        - scale * min(math.ceil(radius_px / scale), (col + centre_col) // scale)
    )
    r1 = min(row + centre_row + radius_px + size, height)
    c1 = min(col + centre_col + radius_px + size, width)
    if r1 - r0 < size + 1 or c1 - c0 < size + 1:
        return None
    window: npt.NDArray[Any] = frame[r0:r1, c0:c1].astype(np.float32)
    if scale > 1:
        small_h, small_w = window.shape[0] // scale, window.shape[1] // scale
        window = cv2.resize(
            window[: small_h * scale, : small_w * scale],
            (small_w, small_h),
            interpolation=cv2.INTER_AREA,
        )
        if template_small is None:
            n = size // scale
            template_small = cv2.resize(
                template[: n * scale, : n * scale], (n, n), interpolation=cv2.INTER_AREA
            )
        tmpl: npt.NDArray[Any] = template_small
    else:
        tmpl = template
    if window.shape[0] <= tmpl.shape[0] or window.shape[1] <= tmpl.shape[1]:
        return None
    surface = cv2.matchTemplate(window, tmpl, cv2.TM_CCOEFF_NORMED)
    # flat windows give NaN/inf in OpenCV's normalisation: never a peak
    np.nan_to_num(surface, copy=False, nan=-1.0, posinf=-1.0, neginf=-1.0)
    _, peak, _, (pc, pr) = cv2.minMaxLoc(surface)
    n_rows, n_cols = surface.shape
    if prior is not None and tie_tolerance > 0:
        near_rows, near_cols = np.nonzero(surface >= peak - tie_tolerance)
        if len(near_rows) > 1:
            # window-local position of the prior displacement
            want_r = (row + prior[0] - r0) / scale
            want_c = (col + prior[1] - c0) / scale
            k = int(np.argmin((near_rows - want_r) ** 2 + (near_cols - want_c) ** 2))
            pr, pc = int(near_rows[k]), int(near_cols[k])
            peak = float(surface[pr, pc])
    sub_r = sub_c = 0.0
    if 0 < pr < n_rows - 1:
        sub_r = parabola_offset(surface[pr - 1, pc], peak, surface[pr + 1, pc])
    if 0 < pc < n_cols - 1:
        sub_c = parabola_offset(surface[pr, pc - 1], peak, surface[pr, pc + 1])
    # window-local -> frame displacement: the template's top-left lands at r0 + pr*scale
    d_row = r0 + (pr + sub_r) * scale - row
    d_col = c0 + (pc + sub_c) * scale - col
    at_edge = pr in (0, n_rows - 1) or pc in (0, n_cols - 1)
    return IntegerMatch(float(d_row), float(d_col), float(peak), at_edge)
