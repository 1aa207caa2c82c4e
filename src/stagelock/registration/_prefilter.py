"""Choose the whole-frame fit's Gaussian pre-filter from the reference's spectrum."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

    from ._fullframe import NoiseModel

__all__ = ["PREFILTER_SIGMAS_PX", "predicted_variance", "prefilter_sigma"]

PREFILTER_SIGMAS_PX = (0.75, 1.0, 1.5, 2.0)
"""Pre-filter widths the whole-frame fit chooses from (its kernels are exact
for these: the band-limited blur below 1 px, a sampled Gaussian from 1 px)."""

SPECTRUM_CROP_PX = 512
"""Side of the central crop whose spectrum decides: enough modes for the sums,
and ~10 ms whatever the frame size."""


def predicted_variance(
    reference: npt.ArrayLike,
    noise: NoiseModel,
    sigmas_px: tuple[float, ...] = PREFILTER_SIGMAS_PX,
) -> dict[float, float]:
    r"""Predict the shift variance (px², x + y) of the fit per pre-filter width.

    Both images are blurred by a Gaussian of width σ; the template is the noisy
    reference. Linearised, the shift error along x of such an estimator is

    .. math::

        \operatorname{var} \hat{x} =
        \frac{\sum_k W^2 k_x^2 (2 S N + N^2)}{(\sum_k W k_x^2 S)^2},
        \quad W = e^{-|k|^2 \sigma^2},

    with ``S`` the signal's power per spatial frequency ``k`` and ``N`` the
    (white) noise power per mode of each image. ``2 S N`` is the two images'
    noise on the signal's gradients, ``N²`` the noise of one image on the
    other's; the Cramér-Rao bound of the two images is ``2 N / Σ k_x² S``. A
    pre-filter trades the first term's loss for the second's: sharp, bright
    content wants little blur, smooth or faint content more. ``S`` is read
    from the noisy reference, ``|R|² - N`` (unbiased, so its sums are too),
    in a Hann-windowed central crop.

    Parameters
    ----------
    reference : ndarray, shape (H, W)
    noise : NoiseModel
        The per-pixel variance model of the reference (and of the frames).
    sigmas_px : tuple of float
        The pre-filter widths to predict.

    Returns
    -------
    dict
        σ → predicted variance; ``inf`` where the signal's gradient energy
        estimate is not positive (no texture above the noise).

    References
    ----------
    .. [1] D. Robinson and P. Milanfar, "Fundamental performance limits in image
       registration", IEEE Trans. Image Process. 13(9), 1185-1199 (2004),
       :doi:`10.1109/TIP.2004.832923`.
    """
    image = np.asarray(reference, dtype=np.float64)
    height, width = image.shape
    ch, cw = min(height, SPECTRUM_CROP_PX), min(width, SPECTRUM_CROP_PX)
    r0, c0 = (height - ch) // 2, (width - cw) // 2
    crop = image[r0 : r0 + ch, c0 : c0 + cw]
    window = np.outer(np.hanning(ch), np.hanning(cw))
    variance = noise.variance(crop.astype(np.float32)).astype(np.float64)
    # white noise of the windowed crop: the same power in every mode
    n2 = float(np.sum(window**2 * variance))
    centred = (crop - np.average(crop, weights=window)) * window
    s2 = np.abs(np.fft.rfft2(centred)) ** 2 - n2
    ky = 2 * np.pi * np.fft.fftfreq(ch)[:, None]
    kx = 2 * np.pi * np.fft.rfftfreq(cw)[None, :]
    # rfft2 holds each mode once, except the columns without a mirror twin
    count = np.full(kx.shape, 2.0)
    count[:, 0] = 1.0
    if cw % 2 == 0:
        count[:, -1] = 1.0
    noise_terms = 2 * s2 * n2 + n2 * n2
    out: dict[float, float] = {}
    for sigma in sigmas_px:
        w = np.exp(-(kx**2 + ky**2) * sigma**2)
        total = 0.0
        for k2 in (kx**2, ky**2):
            info = float(np.sum(count * w * k2 * s2))
            if not info > 0:
                total = math.inf
                break
            total += float(np.sum(count * w * w * k2 * noise_terms)) / info**2
        out[float(sigma)] = total
    return out


def prefilter_sigma(
    reference: npt.ArrayLike,
    noise: NoiseModel,
    *,
    default_px: float = 1.0,
    min_gain: float = 0.05,
) -> float:
    """Choose the pre-filter width (px) predicted to fit ``reference`` best.

    ``default_px`` is kept unless another width's predicted RMS error is lower
    by more than ``min_gain`` (a fraction): the prediction is linearised and
    its spectrum noisy, and the kernels differ in their small systematic
    errors. See :func:`predicted_variance`.
    """
    variances = predicted_variance(reference, noise)
    base = variances.get(float(default_px), math.inf)
    best = min(variances, key=lambda s: (variances[s], abs(s - default_px)))
    if math.isfinite(variances[best]) and (
        not math.isfinite(base) or math.sqrt(variances[best] / base) < 1.0 - min_gain
    ):
        return best
    return float(default_px)
