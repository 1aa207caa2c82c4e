"""Pixel hygiene shared by the daemon and the stack tools (not the engine)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["finite_pixels"]


def finite_pixels(image: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Return ``image`` with NaN/inf pixels replaced by the median of the others.

    One hot or dead pixel stored as NaN or inf in a float frame would otherwise
    make the whole frame look blank to the registration. Integer images and
    float images without such pixels are returned as they are (no copy).

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
    out[~ok] = np.median(image[ok]) if ok.any() else 0
    return out
