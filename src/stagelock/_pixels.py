"""Pixel hygiene shared by the daemon and the stack tools (not the engine)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["finite_pixels"]


def finite_pixels(image: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Return ``image`` with NaN/inf pixels replaced by the median of their neighbours.

    One hot or dead pixel stored as NaN or inf in a float frame would otherwise
    make the whole frame look blank to the registration. Each is filled with the
    median of the finite pixels of its 3x3 neighbourhood, as a camera's defect
    correction does, so a template region that holds it keeps its texture;
    where none of them is finite, with the median of the whole frame. Integer
    images and float images without such pixels are returned as they are (no
    copy).

    Parameters
    ----------
    image : ndarray
        A 2-D frame.

    Returns
    -------
    ndarray
        The same array, or a cleaned copy.
    """
    if image.dtype.kind not in "fc":
        return image
    ok = np.isfinite(image)
    if ok.all():
        return image
    out = np.array(image, copy=True)
    if not ok.any():
        out[...] = 0
        return out
    rows, cols = np.nonzero(~ok)
    padded = np.pad(np.where(ok, image, np.nan), 1, constant_values=np.nan)
    # the 3x3 neighbourhoods of the bad pixels only: (n_bad, 9)
    near = np.stack(
        [padded[rows + dr, cols + dc] for dr in range(3) for dc in range(3)], axis=1
    )
    finite = np.isfinite(near)
    fill = np.full(len(rows), np.median(image[ok]), dtype=np.float64)
    has = finite.any(axis=1)
    if has.any():
        fill[has] = np.nanmedian(near[has], axis=1)
    out[rows, cols] = fill
    return out
