"""Sub-pixel translation by Gauss-Newton refinement with exact fractional shifts.

Why not OpenCV's ``warpAffine``/``remap``: they quantise sub-pixel positions to
1/32 px (``INTER_BITS = 5``), which alone biases a translation estimate by up to
±0.016 px. A translation applies the *same* fractional offset to every pixel, so
it is a separable convolution with a kernel computed in float for that exact
offset; ``cv2.sepFilter2D`` applies it at full precision and SIMD speed. All
template regions are displaced by the same amount, so they are stacked into one
array and resampled by a single call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "KERNEL_RADIUS",
    "LEFT_TOLERANCE",
    "RegionFit",
    "RegionStack",
    "bandlimited_response",
    "bandlimited_shift_kernel",
    "error_left_px",
    "gaussian_shift_kernel",
    "learn_contraction",
    "learn_step_efficiency",
    "shift_kernel",
]

KERNEL_RADIUS = 4
"""Lanczos-4: 8 taps per axis; the interpolation bias stays at the millipixel level
on well-sampled microscope images (measured in ``bench/``)."""

_TAPS = np.arange(-KERNEL_RADIUS + 1, KERNEL_RADIUS + 1, dtype=np.float64)


def learn_step_efficiency(
    eta: float,
    step: tuple[float, float],
    previous: tuple[float, float, float] | None,
    sigma_px: float,
) -> float:
    """Update the Gauss-Newton step efficiency η from two successive plain steps.

    With a noisy reference the template's gradients carry noise energy, so each
    plain Gauss-Newton step undershoots by the signal fraction η of that energy
    (errors in variables): ``plain_k+1 = (1 - g_k η) plain_k`` for a step scaled
    by the gain ``g_k``, hence ``η = (1 - ratio) / g_k``. The fixed point is
    unbiased; η only restores fast convergence (steps are scaled by ``1/η``).
    It is learnt across frames (an exponential average) and only from steps
    well above the statistical uncertainty ``sigma_px``.

    Parameters
    ----------
    eta : float
        The current estimate.
    step : (float, float)
        The plain (unscaled) step just computed, rows and columns.
    previous : (float, float, float) or None
        The previous plain step and the gain it was applied with.
    sigma_px : float
        The shift's statistical uncertainty.

    Returns
    -------
    float
        The updated η (unchanged when the steps say nothing reliable).

    References
    ----------
    .. [1] Baker, S. & Matthews, I. (2004). Lucas-Kanade 20 years on: a unifying
       framework. IJCV 56, 221-255. https://doi.org/10.1023/B:VISI.0000011205.11775.fd
    """
    if previous is None:
        return eta
    norm2 = previous[0] ** 2 + previous[1] ** 2
    if norm2 <= max(2e-3, 5.0 * sigma_px) ** 2:
        return eta
    ratio = (step[0] * previous[0] + step[1] * previous[1]) / norm2
    measured = (1.0 - ratio) / previous[2]
    if not 0.2 < measured < 1.5:
        return eta
    return 0.6 * eta + 0.4 * measured


def learn_contraction(contraction: float, move_px: float, previous_px: float) -> float:
    """Update the learnt contraction of a Gauss-Newton iteration from two moves.

    Near the optimum each move is a fraction ``ρ`` of the one before (linear
    convergence), so the error left after a move of ``m`` is about ``ρ m``. An
    iteration that knows ``ρ`` can stop after the move that leaves less than
    its tolerance, instead of paying one more step to see a small one. The
    estimate jumps up to a larger observed ratio at once and decays by half
    per observation towards smaller ones, so one frame's fast convergence
    cannot talk the next frame out of a step it needs. Start at 1 (unknown);
    :func:`error_left_px` turns it into the error left.

    Parameters
    ----------
    contraction : float
        The current estimate, in (0, 1].
    move_px, previous_px : float
        Two successive moves of one iteration (largest axis), px.

    Returns
    -------
    float
        The updated estimate (unchanged when ``previous_px`` is not positive).
    """
    if not previous_px > 0:
        return contraction
    return max(min(move_px / previous_px, 1.0), 0.5 * contraction)


LEFT_TOLERANCE = 0.2
"""Error a Gauss-Newton iteration may leave, predicted by :func:`error_left_px`,
as a fraction of the move it stops below (that rule leaves ~ρ of the move)."""


def error_left_px(move_px: float, contraction: float) -> float:
    """Error an iteration contracting by ``contraction`` has left after a move.

    The geometric tail of the moves still to come, ``m ρ / (1 - ρ)``; the move
    itself when ``ρ >= 1/2`` (the tail would be at least the move: no credit).
    """
    if contraction >= 0.5:
        return move_px
    return move_px * contraction / (1.0 - contraction)


def gaussian_shift_kernel(frac: float, sigma_px: float) -> npt.NDArray[np.float32]:
    """Gaussian blur and sub-pixel shift in one kernel: ``G_σ`` sampled at ``k - frac``.

    ``out[x] = sum_k kernel[k] * signal[x + k - h]`` (``h = ceil(3.5σ)``, length
    ``2h + 2``) is the signal blurred by a Gaussian of ``sigma_px`` and evaluated
    at ``x + frac``. For σ >= 1 the Gaussian is nearly band-limited, so this is
    exact to a fraction of a percent of the Nyquist content, with no
    interpolation kernel's phase error at all.
    """
    half = math.ceil(3.5 * sigma_px)
    # ~10 taps: scalar math beats numpy's per-call overhead (once per axis per step)
    weights = [
        math.exp(-0.5 * ((k - frac) / sigma_px) ** 2) for k in range(-half, half + 2)
    ]
    total = sum(weights)
    return np.array([w / total for w in weights], dtype=np.float32)


BANDLIMITED_HALF = 5
"""Half-length of :func:`bandlimited_shift_kernel`: 12 taps per axis."""

BAND_TAPER_FROM = 0.35
"""Frequency (cycle/px) above which :func:`bandlimited_response` tapers to zero
at Nyquist. A response that jumps to zero at the band's edge rings for many
taps and a short kernel's truncation biases the shift of sharp content: 1 mpx
on bright spots at σ = 0.5 px, three times their Cramér-Rao bound; tapered,
0.05 mpx (measured in ``bench/efficiency_gap.py``'s set)."""

# Gauss-Legendre nodes on [-1/2, 1/2]: the kernel's integral over the band
_BAND_K, _BAND_W = (0.5 * a for a in np.polynomial.legendre.leggauss(48))


def bandlimited_response(k: npt.ArrayLike, sigma_px: float) -> npt.NDArray[np.float64]:
    """Frequency response of :func:`bandlimited_shift_kernel` (magnitude).

    ``exp(-2π²σ²k²)`` up to :data:`BAND_TAPER_FROM`, then times a raised
    cosine that reaches zero at ``|k| = 1/2`` cycle/px; zero beyond.

    Parameters
    ----------
    k : array_like
        Spatial frequency, cycle/px.
    sigma_px : float
        The Gaussian blur, px.
    """
    a = np.abs(np.asarray(k, dtype=np.float64))
    ramp = np.clip((a - BAND_TAPER_FROM) / (0.5 - BAND_TAPER_FROM), 0.0, 1.0)
    taper = np.cos(0.5 * math.pi * ramp) ** 2
    out: npt.NDArray[np.float64] = (
        np.exp(-2.0 * math.pi**2 * sigma_px**2 * a**2) * taper * (a <= 0.5)
    )
    return out


def bandlimited_shift_kernel(
    frac: float, sigma_px: float, half: int = BANDLIMITED_HALF
) -> npt.NDArray[np.float64]:
    """Return a band-limited Gaussian blur and sub-pixel shift as one kernel.

    It is the continuous kernel whose frequency response is
    :func:`bandlimited_response` (``exp(-2π²σ²k²)``, tapered to zero at the
    band's edge ``|k| = 1/2`` cycle/px: an exact shift of a sampled signal,
    blurred by σ), sampled at the taps ``k - frac`` and truncated by a Lanczos
    window. A sampled Gaussian (:func:`gaussian_shift_kernel`) is band-limited
    only for σ >= 1: below, its aliased tail biases shifts of sharp content
    (beads, stars); this one keeps a light blur unbiased.

    Parameters
    ----------
    frac : float
        Fractional offset in [0, 1).
    sigma_px : float
        The blur, px (> 0; about 0.5 keeps most of a sharp sample's gradient
        information while taming the kernel's tail).
    half : int
        ``out[x] = sum_k kernel[k] * signal[x + k - half]``, ``2 * half + 2``
        taps.

    Returns
    -------
    ndarray of float64, shape (2 * half + 2,)
        Weights summing to one.
    """
    taps = np.arange(-half, half + 2, dtype=np.float64) - frac
    response = bandlimited_response(_BAND_K, sigma_px) * _BAND_W
    weights = np.cos(2.0 * math.pi * np.outer(taps, _BAND_K)) @ response
    weights *= np.sinc(taps / (half + 1.5))
    out: npt.NDArray[np.float64] = weights / weights.sum()
    return out


def shift_kernel(frac: float) -> npt.NDArray[np.float32]:
    """Lanczos-4 weights that sample a signal ``frac`` px ahead.

    Parameters
    ----------
    frac : float
        Fractional offset in [0, 1).

    Returns
    -------
    ndarray of float32, shape (8,)
        ``out[x] = sum_k kernel[k] * signal[x + k - 3]`` evaluates the signal at
        ``x + frac``. The weights sum to one so a flat signal is kept.
    """
    t = _TAPS - frac
    weights = np.sinc(t) * np.sinc(t / KERNEL_RADIUS)
    weights /= weights.sum()
    return weights.astype(np.float32)


def _white_noise_variance(window: npt.NDArray[Any]) -> float:
    """Variance of a window's white noise, from its 4-neighbour high-pass.

    The high-pass of white noise of variance ``v`` has variance ``1.25 v``; the
    median of its square (0.455 of the mean for Gaussian noise) is robust to the
    sparse structure that also passes: edges, spots.
    """
    img = np.asarray(window, dtype=np.float32)
    if min(img.shape) < 3:
        return 0.0
    high = img[1:-1, 1:-1] - 0.25 * (
        img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:]
    )
    return float(np.median(high * high)) / 0.455 / 1.25


def _gradient_noise_gain(smooth_sigma_px: float) -> float:
    """Sum over x and y of the gradients' noise gain for unit white noise.

    The template's gradient is a central difference (taps ±1/2) of the
    reference blurred by the sampled Gaussian (none at σ = 0).
    """
    blur = (
        gaussian_shift_kernel(0.0, smooth_sigma_px).astype(np.float64)
        if smooth_sigma_px > 0
        else np.ones(1)
    )
    deriv = np.convolve(blur, [0.5, 0.0, -0.5])
    return 2.0 * float(np.sum(blur**2) * np.sum(deriv**2))


def _blurred_window(
    image: npt.NDArray[Any],
    window: tuple[int, int, int, int],
    kernel: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """Rows r0:r1, cols c0:c1 of ``image`` blurred by ``kernel`` (frac-0 taps).

    Same values as blurring the whole image with reflected borders, reading only
    the window plus the kernel's reach.
    """
    r0, r1, c0, c1 = window
    height, width = image.shape
    half = len(kernel) // 2 - 1  # taps -half..half+1
    ia, ib, ic, id_ = r0 - half, r1 + half + 1, c0 - half, c1 + half + 1
    crop: npt.NDArray[Any] = np.asarray(
        image[max(ia, 0) : min(ib, height), max(ic, 0) : min(id_, width)],
        dtype=np.float32,
    )
    top, bottom = max(0, -ia), max(0, ib - height)
    left, right = max(0, -ic), max(0, id_ - width)
    if top or bottom or left or right:
        crop = cv2.copyMakeBorder(
            crop, top, bottom, left, right, cv2.BORDER_REFLECT_101
        )
    out = cv2.sepFilter2D(crop, cv2.CV_32F, kernel, kernel, anchor=(0, 0))
    return np.asarray(out[: r1 - r0, : c1 - c0], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class RegionFit:
    """Per-region outcome of one Gauss-Newton step at a common displacement.

    All arrays have one entry per region; invalid regions (patch outside the
    frame, flat patch) have ``valid == False`` and NaN estimates.

    Attributes
    ----------
    d_row, d_col : ndarray, shape (n,)
        Each region's estimate of the displacement (one linearised step from the
        common displacement the patches were sampled at).
    cov : ndarray, shape (n, 2, 2)
        Covariance of (d_row, d_col) per region, from the residual variance and
        the Gauss-Newton normal matrix.
    ncc : ndarray, shape (n,)
        Normalised correlation of each template with its frame patch.
    valid : ndarray of bool, shape (n,)
    """

    d_row: npt.NDArray[np.float64]
    d_col: npt.NDArray[np.float64]
    cov: npt.NDArray[np.float64]
    ncc: npt.NDArray[np.float64]
    valid: npt.NDArray[np.bool_]


class RegionStack:
    """Template regions of a reference, prepared for inverse-compositional fits.

    Each frame patch ``I`` displaced by ``d`` is modelled as ``a * T(x + Δ) + b``:
    a gain and offset (bleaching, lamp drift) and a small translation. Linearised,
    ``I ≈ a T + (aΔx) ∂T/∂x + (aΔy) ∂T/∂y + b`` is *linear* in its four unknowns,
    and its 4x4 normal matrix depends on the template only, so it is inverted once
    here (the inverse-compositional formulation of Baker & Matthews [1]_).

    Parameters
    ----------
    reference : ndarray of float32, shape (H, W)
    corners : sequence of (row, col)
        Top-left corners of the regions.
    size : int
        Side of the square regions.
    smooth_sigma_px : float
        Gaussian pre-filter applied to the reference and, fused into the
        resampling kernel, to every frame patch: at low signal it suppresses the
        noise that dominates the high frequencies of both images.

    Notes
    -----
    Not thread-safe: resampling reuses one buffer.

    References
    ----------
    .. [1] S. Baker and I. Matthews, "Lucas-Kanade 20 years on: a unifying
       framework", IJCV 56(3), 221-255 (2004),
       :doi:`10.1023/B:VISI.0000011205.11775.fd`.
    """

    def __init__(
        self,
        reference: npt.NDArray[Any],
        corners: list[tuple[int, int]],
        size: int,
        smooth_sigma_px: float = 0.0,
    ) -> None:
        height, width = reference.shape
        self.smooth_sigma_px = float(smooth_sigma_px)
        # Gauss-Newton step efficiency and contraction, learnt by the Registrar
        # for this template
        self.eta = 1.0
        self.contraction = 1.0
        blur: npt.NDArray[np.float32] | None = None
        self._reach = self.reach_px(smooth_sigma_px)
        side = size + 2 * self._reach + 1
        if smooth_sigma_px > 0:
            # the same sampled Gaussian as the frames get, at zero shift
            blur = gaussian_shift_kernel(0.0, smooth_sigma_px)
        self.size = size
        self._corners = [(int(r), int(c)) for r, c in corners]
        self.rows = np.array([r for r, _ in corners], dtype=np.int64)
        self.cols = np.array([c for _, c in corners], dtype=np.int64)
        n, p = len(corners), size * size
        self.patches = np.empty((n, size, size), dtype=np.float32)
        basis = np.empty((n, 4, p), dtype=np.float32)
        noise_var = np.empty(n)
        for i, (row, col) in enumerate(corners):
            # gradients from a 1-px larger crop so border pixels have neighbours
            r0, r1 = max(row - 1, 0), min(row + size + 1, height)
            c0, c1 = max(col - 1, 0), min(col + size + 1, width)
            if blur is None:
                crop = reference[r0:r1, c0:c1]
            else:
                # blur only around the regions: a whole 2048² frame costs ~10 ms
                crop = _blurred_window(reference, (r0, r1, c0, c1), blur)
            grad_x = cv2.Sobel(crop, cv2.CV_32F, 1, 0, ksize=1, scale=0.5)
            grad_y = cv2.Sobel(crop, cv2.CV_32F, 0, 1, ksize=1, scale=0.5)
            sl = (slice(row - r0, row - r0 + size), slice(col - c0, col - c0 + size))
            noise_var[i] = _white_noise_variance(reference[r0:r1, c0:c1])
            patch = crop[sl]
            self.patches[i] = patch
            # zero-mean template: frame patches are centred too, which keeps the
            # float32 sums well conditioned whatever the camera offset
            basis[i, 0] = (patch - patch.mean()).ravel()
            basis[i, 1] = grad_x[sl].ravel()
            basis[i, 2] = grad_y[sl].ravel()
            basis[i, 3] = 1.0
        basis64 = basis.astype(np.float64)
        normal = np.matmul(basis64, basis64.transpose(0, 2, 1))
        self.basis = basis
        self.normal_inv: npt.NDArray[np.float64] = np.linalg.pinv(normal)
        self.texture: npt.NDArray[np.float64] = (
            np.linalg.eigvalsh(normal[:, 1:3, 1:3])[:, 0] / p
        )
        self._t_norm = np.sqrt(
            np.einsum("np,np->n", basis[:, 0], basis[:, 0], dtype=np.float64)
        )
        # the share of each template's gradient energy that is signal: the
        # rest is the reference's own noise through the gradient filter
        energy = np.einsum("nqp,nqp->n", basis64[:, 1:3], basis64[:, 1:3])
        noise_energy = noise_var * p * _gradient_noise_gain(smooth_sigma_px)
        self.signal_fraction: npt.NDArray[np.float64] = np.clip(
            1.0 - noise_energy / np.maximum(energy, 1e-300), 0.0, 1.0
        )
        self.signal_share = float(
            np.sum(self.signal_fraction * energy) / max(float(np.sum(energy)), 1e-300)
        )
        """The regions' signal fraction of their pooled gradient energy."""
        # covariance of (Δy, Δx) per unit residual variance and unit gain
        self._cov_unit = self.normal_inv[:, [2, 1]][:, :, [2, 1]]
        self._buffer = np.zeros((n, side, side), dtype=np.float32)

    @staticmethod
    def reach_px(smooth_sigma_px: float) -> int:
        """Pixels the resampling kernel reads before a patch (and one fewer than after).

        A region whose corner is closer than ``reach_px + 1`` to a frame edge,
        plus the displacement, cannot be sampled: :meth:`sample` marks it invalid.
        """
        if smooth_sigma_px > 0:
            return math.ceil(3.5 * smooth_sigma_px)
        # Lanczos reaches (radius - 1) px before a pixel and radius after it
        return KERNEL_RADIUS - 1

    def _kernel(self, frac: float) -> npt.NDArray[np.float32]:
        if self.smooth_sigma_px > 0:
            return gaussian_shift_kernel(frac, self.smooth_sigma_px)
        return shift_kernel(frac)

    def __len__(self) -> int:
        return len(self.rows)

    def sample(
        self, frame: npt.NDArray[np.generic], d_row: float, d_col: float
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Frame patches of every region displaced by ``(d_row, d_col)``.

        Returns
        -------
        patches : ndarray of float32, shape (n, size * size)
        valid : ndarray of bool, shape (n,)
            False where the displaced patch (plus the kernel's reach) leaves the
            frame; those patches are zeros.
        """
        size = self.size
        side = self._buffer.shape[1]
        n_row, n_col = math.floor(d_row), math.floor(d_col)
        off_row, off_col = n_row - self._reach, n_col - self._reach
        height, width = frame.shape
        buf = self._buffer
        valid = np.zeros(len(self._corners), dtype=bool)
        # a handful of regions: plain ints, no per-region numpy scalars
        for i, (row, col) in enumerate(self._corners):
            r0, c0 = row + off_row, col + off_col
            if r0 >= 0 and c0 >= 0 and r0 + side <= height and c0 + side <= width:
                buf[i] = frame[r0 : r0 + side, c0 : c0 + side]
                valid[i] = True
            else:
                buf[i] = 0.0
        out = cv2.sepFilter2D(
            buf.reshape(-1, side),
            cv2.CV_32F,
            self._kernel(d_col - n_col),
            self._kernel(d_row - n_row),
            anchor=(0, 0),
            borderType=cv2.BORDER_REPLICATE,
        )
        # anchor (0, 0): rows [0, size) of each block read only that block's rows
        patches = np.asarray(out, dtype=np.float32).reshape(-1, side, side)
        return patches[:, :size, :size].reshape(len(valid), size * size), valid

    def fit(
        self, frame: npt.NDArray[np.generic], d_row: float, d_col: float
    ) -> RegionFit:
        """One Gauss-Newton step for every region from the common ``d``."""
        patches, valid = self.sample(frame, d_row, d_col)
        p = patches.shape[1]
        # B P, then c = N^-1 B P; with the constant in the basis the fit ignores
        # the patch mean, and the residual energy follows without forming it:
        # |P - B^T c|^2 = |P|^2 - c . (B P)
        bp = np.matmul(self.basis, patches[:, :, None])[:, :, 0].astype(np.float64)
        coef = np.einsum("nij,nj->ni", self.normal_inv, bp)
        # centred first: float32 sums of squares stay accurate whatever the offset
        centred = patches - (bp[:, 3] / p).astype(np.float32)[:, None]
        energy = np.einsum("np,np->n", centred, centred).astype(np.float64)
        total = energy + bp[:, 3] * bp[:, 3] / p  # |P|^2 = centred energy + p mean^2
        gain = coef[:, 0]
        valid = valid & (gain > 0) & (energy > 0)
        safe = np.where(valid, gain, 1.0)
        # inverse composition: T(x + Δ) ~ I(x + d)  =>  d <- d - Δ
        est_col = np.where(valid, d_col - coef[:, 1] / safe, np.nan)
        est_row = np.where(valid, d_row - coef[:, 2] / safe, np.nan)
        resid = np.clip(total - np.einsum("ni,ni->n", coef, bp), 0.0, None)
        # float32 data cannot resolve residuals below ~1e-7 of the energy: floor
        # there so a noiseless match gets a finite, equal-weight covariance
        sigma2 = np.maximum(resid, 1e-7 * energy + 1e-30) / max(p - 4, 1)
        cov = self._cov_unit * (sigma2 / (safe * safe))[:, None, None]
        den = self._t_norm * np.sqrt(np.where(energy > 0, energy, 1.0))
        ncc = np.where(valid, bp[:, 0] / den, 0.0)
        return RegionFit(est_row, est_col, cov, ncc, valid)
