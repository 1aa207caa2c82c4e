"""Choose the whole-frame fit's Gaussian pre-filter from the reference's spectrum."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ._subpixel import bandlimited_response

if TYPE_CHECKING:
    import numpy.typing as npt

    from ._fullframe import NoiseModel

__all__ = ["PREFILTER_SIGMAS_PX", "predicted_variance", "prefilter_sigma"]

PREFILTER_SIGMAS_PX = (0.5, 0.75, 1.0, 1.5, 2.0)
"""Pre-filter widths the whole-frame fit chooses from (its kernels are exact
for these: the band-limited blur below 1 px, a sampled Gaussian from 1 px)."""

SPECTRUM_TILE_PX = 256
"""Side of the tiles whose mean spectrum decides (at most 4 x 4 of them)."""


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
        \quad W = |G_\sigma(k_x) G_\sigma(k_y)|^2,

    ``G_σ`` the response of the fit's kernel per axis (the band-limited, tapered
    blur below 1 px, :func:`._subpixel.bandlimited_response`; the Gaussian from 1
    px), with ``S`` the signal's power per spatial frequency ``k`` and ``N`` the
    (white) noise power per mode of each image. ``2 S N`` is the two images' noise
    on the signal's gradients, ``N²`` the noise of one image on the other's; the
    Cramér-Rao bound of the two images is ``2 N / Σ k_x² S``. A pre-filter trades
    the first term's loss for the second's: sharp, bright content wants little blur,
    smooth or faint content more. ``S`` is read from the noisy reference, ``|R|² -
    N`` (unbiased, so its sums are too), averaged over Hann-windowed tiles (Welch
    [2]_).

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
    .. [2] P. Welch, "The use of fast Fourier transform for the estimation of
       power spectra", IEEE Trans. Audio Electroacoust. 15(2), 70-73 (1967),
       :doi:`10.1109/TAU.1967.1161901`.
    """
    image = np.asarray(reference, dtype=np.float64)
    height, width = image.shape
    ch, cw = min(height, SPECTRUM_TILE_PX), min(width, SPECTRUM_TILE_PX)
    window = np.outer(np.hanning(ch), np.hanning(cw))
    # Welch: the mean periodogram of windowed tiles spread over the frame, so
    # content off the centre counts (and at most 16 FFTs whatever the size)
    power = np.zeros((ch, cw // 2 + 1))
    n2 = 0.0
    rows = np.unique(np.linspace(0, height - ch, min(4, height // ch)).round())
    cols = np.unique(np.linspace(0, width - cw, min(4, width // cw)).round())
    for r0 in rows.astype(int):
        for c0 in cols.astype(int):
            tile = image[r0 : r0 + ch, c0 : c0 + cw]
            variance = noise.variance(tile.astype(np.float32)).astype(np.float64)
            # white noise of the windowed tile: the same power in every mode
            n2 += float(np.sum(window**2 * variance))
            centred = (tile - np.average(tile, weights=window)) * window
            power += np.abs(np.fft.rfft2(centred)) ** 2
    n_tiles = len(rows) * len(cols)
    n2 /= n_tiles
    s2 = power / n_tiles - n2
    ky = 2 * np.pi * np.fft.fftfreq(ch)[:, None]
    kx = 2 * np.pi * np.fft.rfftfreq(cw)[None, :]
    # rfft2 holds each mode once, except the columns without a mirror twin
    count = np.full(kx.shape, 2.0)
    count[:, 0] = 1.0
    if cw % 2 == 0:
        count[:, -1] = 1.0
    signal = count * s2
    noise_terms = count * (2 * s2 * n2 + n2 * n2)
    axes = (np.broadcast_to(kx**2, s2.shape), np.broadcast_to(ky**2, s2.shape))
    out: dict[float, float] = {}
    for sigma in sigmas_px:
        w = _response_squared(kx, ky, sigma)
        ws, wwn = w * signal, w * w * noise_terms
        total = 0.0
        for k2 in axes:
            info = float(np.vdot(ws, k2))
            if not info > 0:
                total = math.inf
                break
            total += float(np.vdot(wwn, k2)) / info**2
        out[float(sigma)] = total
    return out


def _response_squared(
    kx: npt.NDArray[np.floating[Any]], ky: npt.NDArray[np.floating[Any]], sigma: float
) -> npt.NDArray[np.float64]:
    """``|G_σ(kx) G_σ(ky)|²`` of the fit's resampling kernel (k in rad/px)."""
    if sigma >= 1:
        out: npt.NDArray[np.float64] = np.exp(-(kx**2 + ky**2) * sigma**2)
        return out
    gx = bandlimited_response(kx / (2 * np.pi), sigma)
    gy = bandlimited_response(ky / (2 * np.pi), sigma)
    return np.asarray((gx * gy) ** 2)


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
