"""The Cramér-Rao lower bound of a translation estimate, from a noiseless image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["ShiftBound", "camera_variance", "shift_crlb"]


@dataclass(frozen=True, slots=True)
class ShiftBound:
    """The Cramér-Rao lower bound of an unbiased shift estimator.

    Attributes
    ----------
    sigma_x_px, sigma_y_px : float
        Smallest achievable standard deviation of ``dx_px`` and ``dy_px``.
    rms_px : float
        Smallest achievable RMS of the 2-D error: ``sqrt(var_x + var_y)``, the
        number to compare with a benchmark's RMS of ``hypot(ex, ey)``.
    fisher : tuple of tuple of float
        The 2x2 Fisher information matrix in (x, y) order, px⁻².
    """

    sigma_x_px: float
    sigma_y_px: float
    rms_px: float
    fisher: tuple[tuple[float, float], tuple[float, float]]


def _spectral_gradients(
    image: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Exact derivatives of the band-limited image (mirror-extended, no edge jump)."""
    ext = np.block([[image, image[:, ::-1]], [image[::-1, :], image[::-1, ::-1]]])
    spec = np.fft.rfft2(ext)
    ky = np.fft.fftfreq(ext.shape[0])[:, None]
    kx = np.fft.rfftfreq(ext.shape[1])[None, :]
    # the Nyquist terms of an even-length transform have no defined derivative
    spec[ext.shape[0] // 2, :] = 0
    if ext.shape[1] % 2 == 0:
        spec[:, -1] = 0
    gx = np.fft.irfft2(spec * (2j * np.pi * kx), s=ext.shape)
    gy = np.fft.irfft2(spec * (2j * np.pi * ky), s=ext.shape)
    h, w = image.shape
    return np.asarray(gx[:h, :w]), np.asarray(gy[:h, :w])


def shift_crlb(
    image: npt.ArrayLike,
    variance: npt.ArrayLike | float,
    *,
    reference_variance: npt.ArrayLike | float | None = None,
    mask: npt.ArrayLike | None = None,
) -> ShiftBound:
    """Cramér-Rao bound of the translation between two images of one scene.

    Parameters
    ----------
    image : ndarray, shape (H, W)
        The noiseless image (expected value of every pixel, in the same units as
        ``variance``, e.g. ADU or photo-electrons).
    variance : ndarray of shape (H, W) or float
        Noise variance of each pixel of the measured frame: for a camera,
        ``expected electrons / gain² + read noise² / gain²`` in ADU²
        (:func:`camera_variance`).
    reference_variance : ndarray or float, optional
        Noise variance of the reference when it is itself a noisy frame (frame 0
        of a movie): it adds to ``variance`` (both images' noise moves the
        estimate). Default: a noiseless reference.
    mask : ndarray of bool, optional
        Pixels that enter the estimate (the overlap, or the covered part);
        default every pixel.

    Returns
    -------
    ShiftBound

    Notes
    -----
    For Gaussian noise of variance ``v(x)`` and a mean image ``λ(x)`` moved by
    ``d``, the Fisher information is ``F = Σ_x ∇λ ∇λᵀ / v(x)`` (Robinson &
    Milanfar [1]_; for Poisson noise with ``v = λ`` it is the exact Poisson
    information, Pham et al. [2]_). With a noisy reference the two images' noise
    add, ``v = v_frame + v_reference``, to first order. The gradients are the
    exact derivatives of the band-limited image (Fourier, on the mirror-extended
    image). The bound holds for unbiased estimators; a pre-filter that removes
    noise cannot beat it, only approach it.

    References
    ----------
    .. [1] D. Robinson and P. Milanfar, "Fundamental performance limits in image
       registration", IEEE Trans. Image Process. 13(9), 1185-1199 (2004),
       :doi:`10.1109/TIP.2004.832923`.
    .. [2] T. Q. Pham, M. Bezuijen, L. J. van Vliet, K. Schutte and C. L.
       Luengo Hendriks, "Performance of optimal registration estimators", Proc.
       SPIE 5817, 133-144 (2005), :doi:`10.1117/12.603304`.

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.mgrid[:64, :64]
    >>> spot = 1000 * np.exp(-((x - 32.0) ** 2 + (y - 32.0) ** 2) / 8.0) + 10
    >>> bound = shift_crlb(spot, spot)  # Poisson noise in photons
    >>> round(bound.sigma_x_px, 3)
    0.063
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D; got shape {img.shape}")
    var = np.broadcast_to(np.asarray(variance, dtype=np.float64), img.shape)
    if reference_variance is not None:
        var = var + np.broadcast_to(
            np.asarray(reference_variance, dtype=np.float64), img.shape
        )
    if not np.all(var > 0):
        raise ValueError("variance must be > 0 everywhere")
    gx, gy = _spectral_gradients(img)
    inv = 1.0 / var
    if mask is not None:
        inv = inv * np.asarray(mask, dtype=bool)
    fxx = float(np.sum(gx * gx * inv))
    fyy = float(np.sum(gy * gy * inv))
    fxy = float(np.sum(gx * gy * inv))
    det = fxx * fyy - fxy * fxy
    if not det > 0:
        return ShiftBound(math.inf, math.inf, math.inf, ((fxx, fxy), (fxy, fyy)))
    var_x, var_y = fyy / det, fxx / det
    return ShiftBound(
        math.sqrt(var_x),
        math.sqrt(var_y),
        math.sqrt(var_x + var_y),
        ((fxx, fxy), (fxy, fyy)),
    )


def camera_variance(
    electrons: npt.ArrayLike,
    *,
    read_noise_e: float = 1.6,
    gain_e_per_adu: float = 0.46,
) -> npt.NDArray[np.float64]:
    """Per-pixel variance (ADU²) of a sCMOS frame with these expected electrons.

    Parameters
    ----------
    electrons : ndarray
        Expected photo-electrons per pixel (signal + background).
    read_noise_e : float
        Read noise, electrons RMS.
    gain_e_per_adu : float
        Electrons per ADU.

    Returns
    -------
    ndarray of float64
        ``(electrons + read_noise_e²) / gain_e_per_adu²``: Poisson shot noise
        plus Gaussian read noise (the rounding to integer ADU, 1/12 ADU², is
        left out).
    """
    e = np.asarray(electrons, dtype=np.float64)
    return np.asarray((e + read_noise_e**2) / gain_e_per_adu**2)
