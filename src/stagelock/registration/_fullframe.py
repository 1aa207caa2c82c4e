"""Noise-weighted, robust Gauss-Newton translation fit over a large part of the frame.

The region engine (:mod:`._subpixel`) reads a few template windows: fast, but it
uses a few per cent of the photons of a large frame. This module fits the same
model, ``frame(x + d) = a_t * ref(x) + b_t`` with a gain and offset per tile ``t``,
over every pixel of a chosen set of tile *bands* (full-width strips of tiles, the
most informative first), so the covered fraction of the frame is a knob from a
few bands to the whole overlap.

Per iteration the frame is resampled once, by the same exactly sampled
shift kernel as the regions (a Gaussian pre-filter fused with the sub-pixel
shift, or Lanczos-4), so there is no pixel locking; every other operation is an
element-wise product and a sum per tile, both memory-bound.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from ._prefilter import prefilter_sigma
from ._subpixel import (
    BANDLIMITED_HALF,
    KERNEL_RADIUS,
    LEFT_TOLERANCE,
    bandlimited_shift_kernel,
    error_left_px,
    gaussian_shift_kernel,
    learn_contraction,
    learn_step_efficiency,
    shift_kernel,
)

#: Shift (px, each axis) up to which the tiles on the frame's edge stay in the fit:
#: their pixels within the kernel's reach plus this of the edge carry no weight.
EDGE_SLACK_PX = 3

__all__ = [
    "FrameFit",
    "FrameSolution",
    "NoiseModel",
    "estimate_noise",
]


@dataclass(frozen=True, slots=True)
class NoiseModel:
    """Per-pixel noise variance ``alpha * mean + beta`` (image units squared).

    Attributes
    ----------
    alpha : float
        Shot-noise slope: variance per unit of mean intensity (1 / gain for a
        camera in ADU, after the offset is absorbed in ``beta``).
    beta : float
        Variance at zero mean: read noise, minus ``alpha`` times the offset.
    floor : float
        Smallest variance returned (the darkest pixels' read noise).
    """

    alpha: float
    beta: float
    floor: float = 1e-12

    def variance(self, mean: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Return the expected variance of pixels whose noiseless value is ``mean``."""
        out = np.maximum(self.alpha * mean + self.beta, max(self.floor, 1e-30))
        return np.asarray(out, dtype=np.float32)


def estimate_noise(image: npt.NDArray[np.float32]) -> NoiseModel:
    """Fit a Poisson + read noise model to one image from its own pixels.

    A 4-neighbour high-pass of white noise of variance ``v`` has variance
    ``1.25 v``; its median square, per bin of local mean, is robust to the
    structure that also leaks through. A line through the bins gives the
    shot-noise slope and the read-noise intercept (a sCMOS/EMCCD camera:
    variance = signal / gain + read noise²).

    Parameters
    ----------
    image : ndarray of float32, shape (H, W)

    Returns
    -------
    NoiseModel
        Floored at 1e-6 of the image's squared range, so a noiseless image gets
        uniform, finite weights.
    """
    img = np.asarray(image, dtype=np.float32)
    centre = img[1:-1, 1:-1]
    neigh = 0.25 * (img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:])
    high = (centre - neigh).ravel()
    mean = cv2.blur(img, (5, 5))[1:-1, 1:-1].ravel()
    step = max(1, high.size // 50_000)  # a deterministic sparse sample
    high, mean = high[::step], mean[::step]
    lo, hi = np.percentile(img[:: max(1, img.shape[0] // 256)], [1.0, 99.0])
    floor = 1e-6 * float(hi - lo) ** 2 + 1e-12
    edges = np.quantile(mean, np.linspace(0.0, 1.0, 9))
    xs, ys = [], []
    for a, b in itertools.pairwise(edges):
        sel = (mean >= a) & (mean <= b)
        if np.count_nonzero(sel) < 50:
            continue
        xs.append(float(np.median(mean[sel])))
        # median of chi2(1) is 0.455; 1.25: the high-pass gain on white noise
        ys.append(float(np.median(high[sel] ** 2)) / 0.455 / 1.25)
    if len(xs) < 2:
        v = max(float(np.median(high**2)) / 0.57, floor)
        return NoiseModel(0.0, v, v)
    x, y = np.array(xs), np.array(ys)
    slope, intercept = np.polyfit(x, y, 1)
    slope = max(float(slope), 0.0)
    beta = float(np.median(y - slope * x)) if slope == 0.0 else float(intercept)
    # the darkest bin bounds the variance from below (read noise)
    floor = max(floor, 0.5 * float(y.min()))
    return NoiseModel(slope, beta, floor)


def _fit_variance_line(
    level: npt.NDArray[np.float64], square: npt.NDArray[np.float64]
) -> NoiseModel | None:
    """Fit ``E[square] = alpha * level + beta`` to squared zero-mean residuals.

    Weighted least squares with weights ``1 / v²`` (a squared Gaussian's
    variance is ``2 v²``), iterated; squares beyond ``9 v`` (3σ: debris, a
    residual of structure) are left out and the truncation's 2.7 % deficit is
    restored. Unlike medians over bins of level, this uses every residual at
    its own level: on sparse spots most bins would sit on the background, and
    a wide bin's median under-reads its mean.
    """
    if level.size < 100 or not float(np.median(square)) > 0:
        return None
    var = np.full_like(level, float(np.mean(square)))
    alpha = beta = 0.0
    lo = float(np.percentile(level, 1.0))
    for _ in range(6):
        keep = square < 9.0 * var
        w = 1.0 / var[keep] ** 2
        x, y = level[keep], square[keep]
        sw, sx, sy = w.sum(), (w * x).sum(), (w * y).sum()
        sxx, sxy = (w * x * x).sum(), (w * x * y).sum()
        det = sw * sxx - sx * sx
        if not det > 0:
            alpha, beta = 0.0, sy / sw
        else:
            alpha = (sw * sxy - sx * sy) / det
            beta = (sxx * sy - sx * sxy) / det
        if alpha < 0:
            alpha, beta = 0.0, sy / sw
        alpha, beta = alpha / TRUNCATED_SQUARE_MEAN, beta / TRUNCATED_SQUARE_MEAN
        floor = 0.5 * max(alpha * lo + beta, 1e-30)
        var = np.maximum(alpha * level + beta, floor)
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        return None
    if np.count_nonzero(square >= 9.0 * var) > 0.02 * square.size:
        # Gaussian noise passes 3σ in 0.27 % of pixels: this is structure the
        # fit did not explain (a wrong or poor fit), not noise
        return None
    return NoiseModel(float(alpha), float(beta), float(floor))


TRUNCATED_SQUARE_MEAN = 0.9733
"""Mean of a squared standard normal given it is below 9 (3σ)."""


def _shift_kernel(frac: float, sigma: float) -> npt.NDArray[np.float64]:
    """Return the frames' resampling kernel for ``sigma``.

    σ >= 1: a sampled Gaussian (band-limited enough); 0 < σ < 1: the band-limited
    blur; σ = 0: Lanczos-4.
    """
    if sigma >= 1:
        return gaussian_shift_kernel(frac, sigma).astype(np.float64)
    if sigma > 0:
        return bandlimited_shift_kernel(frac, sigma)
    return shift_kernel(frac).astype(np.float64)


def _kernels(sigma: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Return the resampling kernel at frac 0 and its derivative in frac.

    The derivative of the very kernel the frames are resampled with is the
    gradient the linearisation needs: a central difference under-reads the
    high frequencies of a sharp image, so each Gauss-Newton step overshoots
    (by ~30 % unblurred) and needs extra resamplings of the frame.
    """
    h = 1e-4
    deriv = (_shift_kernel(h, sigma) - _shift_kernel(-h, sigma)) / (2 * h)
    return _shift_kernel(0.0, sigma), deriv


def _noise_gains(sigma: float) -> tuple[float, float]:
    """Noise gains (2-D sums of squares) of the template and of its gradient."""
    k0, dk = _kernels(sigma)
    k2 = float(np.sum(k0**2))
    return k2 * k2, float(np.sum(dk**2)) * k2


def _filtered(
    image: npt.NDArray[np.float32],
    k_row: npt.NDArray[np.float64],
    k_col: npt.NDArray[np.float64],
    reach: int,
) -> npt.NDArray[np.float32]:
    """``image`` resampled at zero shift by separable taps ``k_row`` x ``k_col``.

    Same alignment as the frames' resampling (tap ``j`` reads ``x - reach + j``);
    borders mirrored.
    """
    n = len(k_row)
    pad = cv2.copyMakeBorder(
        image, reach, n - 1 - reach, reach, n - 1 - reach, cv2.BORDER_REFLECT_101
    )
    out = _separable(np.asarray(pad, dtype=np.float32), k_row, k_col)
    return np.ascontiguousarray(out[: image.shape[0], : image.shape[1]])


def _separable(
    window: npt.NDArray[np.float32],
    k_row: npt.NDArray[np.floating[Any]],
    k_col: npt.NDArray[np.floating[Any]],
) -> npt.NDArray[np.float32]:
    """``window`` filtered by separable taps; ``out[i, j]`` reads from ``[i, j]`` on."""
    tmp = cv2.filter2D(
        window, cv2.CV_32F, k_col.reshape(1, -1).astype(np.float32), anchor=(0, 0)
    )
    out = cv2.filter2D(
        tmp, cv2.CV_32F, k_row.reshape(-1, 1).astype(np.float32), anchor=(0, 0)
    )
    return np.asarray(out, dtype=np.float32)


def _reach(sigma: float) -> int:
    if sigma >= 1:
        return math.ceil(3.5 * sigma)
    return BANDLIMITED_HALF if sigma > 0 else KERNEL_RADIUS - 1


def _template_and_gradients(
    image: npt.NDArray[np.float32], sigma: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Template, d/dx and d/dy, all from the frames' own resampling kernel."""
    k0, dk = _kernels(sigma)
    reach = _reach(sigma)
    return (
        _filtered(image, k0, k0, reach),
        _filtered(image, k0, dk, reach),
        _filtered(image, dk, k0, reach),
    )


@dataclass(frozen=True, slots=True)
class FrameSolution:
    """Outcome of a whole-frame fit.

    Attributes
    ----------
    d_row, d_col : float
        Displacement of the frame's content (px) relative to the reference.
    cov : ndarray, shape (2, 2)
        Covariance of (d_row, d_col), px².
    n_tiles : int
        Tiles used in the final step.
    n_valid : int
        Tiles inside the overlap before the robust rejection.
    converged : bool
        The last step moved less than 1e-3 px (or a fraction of σ).
    signal_share : float
        The used tiles' signal fraction of their pooled gradient energy (the
        rest is the reference's noise); 1.0 for a noiseless reference.
    """

    d_row: float
    d_col: float
    cov: npt.NDArray[np.float64]
    n_tiles: int
    n_valid: int
    converged: bool
    signal_share: float = 1.0

    @property
    def sigma_px(self) -> float:
        """1-σ uncertainty per axis (px)."""
        return math.sqrt(max(0.5 * float(self.cov[0, 0] + self.cov[1, 1]), 0.0))


@dataclass(frozen=True, slots=True)
class _Step:
    """One Gauss-Newton step of :class:`FrameFit`, and what the noise scale needs."""

    d_row: float
    d_col: float
    cov: npt.NDArray[np.float64]
    used: npt.NDArray[np.bool_]
    """The tiles the fused step used."""
    n_valid: int
    sums: npt.NDArray[np.float64]
    """Per-tile weighted sums at the displacement the step started from."""
    signal_share: float


class FrameFit:
    """A reference prepared for the whole-frame fit over a fraction of its tiles.

    Parameters
    ----------
    reference : ndarray of float32, shape (H, W)
    coverage : float
        0 < coverage <= 1: fraction of the tile grid's bands used, the most
        informative first (Fisher information of the band, from the reference).
        1.0 uses every tile of the overlap.
    smooth_sigma_px : float or "auto"
        The Gaussian pre-filter fused into the resampling kernel (0: Lanczos-4).
        "auto": 1 px until the noise model is the camera's (given, or learnt
        from the first fitted frame), then the width the reference's spectrum
        predicts most precise (:func:`._prefilter.prefilter_sigma`: 0.75 px
        on sharp or bright content, up to 2 px on faint smooth content).
    tile_px : int, optional
        Side of the tiles that carry a gain and an offset each and are rejected
        as a whole when they do not follow the shift (debris, a bleached patch).
        Default 32 px.
    noise : NoiseModel, optional
        Kept as given. Default: estimated from the reference
        (:func:`estimate_noise`), then fitted once to the residuals of the first
        frame the fit converges on, and the weights rebuilt.

    Notes
    -----
    Each tile's pixels are weighted by the inverse of their expected noise
    variance (shot + read noise of the frame and of the reference), which makes
    the fit the maximum-likelihood estimate under Gaussian noise and brings it
    to the Cramér-Rao bound of the covered pixels (Robinson & Milanfar [1]_).
    The normal matrix is the reference's (inverse compositional, Baker &
    Matthews [2]_) minus the expected energy of the reference's own noise in the
    template and its gradients (bias-compensated least squares): with a noisy
    reference, the plain normal matrix overstates the gradient energy, so every
    Gauss-Newton step would fall short by the signal fraction of that energy.
    The noise the compensation removes is the model's times
    :attr:`noise_scale`, measured from the residuals of the frames fitted so
    far: the single-image noise estimate takes sharp structure for noise (3x
    too much on sparse spots), and an over-compensated gain biases the shift
    wherever the template and its gradients correlate.

    Robustness: a tile is dropped when its weighted residual exceeds 4x the
    median tile's (something there does not follow the shift: debris, a
    saturated blob) or when its own shift is more than 4σ from the fused one.

    Not thread-safe (one work buffer).

    References
    ----------
    .. [1] D. Robinson and P. Milanfar, "Fundamental performance limits in image
       registration", IEEE Trans. Image Process. 13(9), 1185-1199 (2004),
       :doi:`10.1109/TIP.2004.832923`.
    .. [2] S. Baker and I. Matthews, "Lucas-Kanade 20 years on: a unifying
       framework", IJCV 56(3), 221-255 (2004),
       :doi:`10.1023/B:VISI.0000011205.11775.fd`.
    """

    def __init__(
        self,
        reference: npt.NDArray[Any],
        *,
        coverage: float,
        smooth_sigma_px: float | Literal["auto"],
        tile_px: int | None = None,
        noise: NoiseModel | None = None,
    ) -> None:
        if not 0 < coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1]; got {coverage}")
        ref = np.asarray(reference, dtype=np.float32)
        self.reference = ref
        # Gauss-Newton step efficiency, learnt by refine() (see there)
        self.eta = 1.0
        self.contraction = 1.0  # of the iteration, learnt across frames
        height, width = ref.shape
        s = tile_px or 32
        s = int(min(s, height, width))
        self.shape = (height, width)
        self.tile_px = s
        self.coverage = float(coverage)
        n_ty, n_tx = height // s, width // s
        self.origin = ((height - n_ty * s) // 2, (width - n_tx * s) // 2)
        self.n_ty, self.n_tx = n_ty, n_tx
        self.basis_w = np.empty((4, n_ty * s, n_tx * s), dtype=np.float32)
        self._rows = np.empty((5, n_tx * s), dtype=np.float32)
        self._auto_sigma = smooth_sigma_px == "auto"
        self._noise_learnt = noise is not None
        if smooth_sigma_px != "auto":
            sigma = float(smooth_sigma_px)
        elif noise is not None:
            # the camera's model is given: decide now, build once
            self._auto_sigma = False
            sigma = prefilter_sigma(ref, noise)
        else:
            sigma = 1.0
        self._build(sigma)
        self._weigh(noise or estimate_noise(ref))

    def _build(self, sigma: float) -> None:
        """Build the template, its gradients and the grid's reach for ``sigma``."""
        height, width = self.shape
        s, n_ty, n_tx = self.tile_px, self.n_ty, self.n_tx
        r0, c0 = self.origin
        rows, cols = n_ty * s, n_tx * s
        self.sigma = float(sigma)
        c_t, c_g = _noise_gains(self.sigma)
        self.reach = _reach(self.sigma)
        full_t, full_gx, full_gy = _template_and_gradients(self.reference, self.sigma)
        grid = (slice(r0, r0 + rows), slice(c0, c0 + cols))
        # the resampling's reach past the grid: pixels whose resampling at a
        # shift of up to EDGE_SLACK_PX would read past the edge carry no weight,
        # so the edge tiles stay in the fit (dropping them lost 44 % of a 256²
        # frame)
        self.k_len = 2 * self.reach + 2 if self.sigma > 0 else 2 * KERNEL_RADIUS
        lo = self.reach + EDGE_SLACK_PX
        hi_r = height - self.k_len + self.reach - EDGE_SLACK_PX  # last usable row
        hi_c = width - self.k_len + self.reach - EDGE_SLACK_PX
        row_ok = (np.arange(r0, r0 + rows) >= lo) & (np.arange(r0, r0 + rows) <= hi_r)
        col_ok = (np.arange(c0, c0 + cols) >= lo) & (np.arange(c0, c0 + cols) <= hi_c)
        self._inside = (row_ok[:, None] & col_ok[None, :]).astype(np.float32)
        # per tile row/col: first and last weighted frame row/col (-1 if none)
        self._row_span = self._spans(row_ok, r0, n_ty)
        self._col_span = self._spans(col_ok, c0, n_tx)
        self._n_px = np.outer(
            row_ok.reshape(n_ty, s).sum(axis=1), col_ok.reshape(n_tx, s).sum(axis=1)
        )
        self._templ = np.ascontiguousarray(full_t[grid])
        self._grad_x = np.ascontiguousarray(full_gx[grid])
        self._grad_y = np.ascontiguousarray(full_gy[grid])
        self._gains = (c_t, c_g)

    def _choose_sigma(self) -> bool:
        """Rebuild for the pre-filter the spectrum predicts best; True if it moved.

        See :func:`._prefilter.prefilter_sigma`; decided once the noise model
        is learnt from the first frame's residuals (at construction when it is
        given): the single image's estimate overstates the noise of sharp
        content, which would ask for more blur.
        """
        self._auto_sigma = False
        sigma = prefilter_sigma(self.reference, self.noise)
        if sigma == self.sigma:
            return False
        self._build(sigma)
        self._weigh(self.noise)
        return True

    def _weigh(self, noise: NoiseModel) -> None:
        """Build the noise weights and everything that depends on them."""
        s, n_ty, n_tx = self.tile_px, self.n_ty, self.n_tx
        rows, cols = n_ty * s, n_tx * s
        templ, grad_x, grad_y = self._templ, self._grad_x, self._grad_y
        self.noise = noise
        var_raw = noise.variance(templ)
        # frame noise + reference noise; the blur's per-pixel variance reduction
        # is left out on purpose: it does not reduce the noise the smooth basis
        # projects onto (low frequencies pass the blur), and the spread of the
        # tiles' shifts calibrates the covariance anyway
        weight = self.basis_w[3]
        np.divide(0.5, var_raw, out=weight)
        weight *= self._inside
        tile_mean = self._tile_dot(weight, templ) / np.maximum(
            self._tile_sum(weight), 1e-30
        )
        centred = (
            templ.reshape(n_ty, s, n_tx, s)
            - tile_mean.astype(np.float32)[:, None, :, None]
        )
        templ_c = np.ascontiguousarray(centred.reshape(rows, cols))
        # per-tile weighted normal matrices of the basis (T, Gx, Gy, 1), from
        # the weighted basis without full-frame temporaries
        basis = (templ_c, grad_x, grad_y)
        for q, comp in enumerate(basis):
            np.multiply(weight, comp, out=self.basis_w[q])
        normal = np.empty((n_ty, n_tx, 4, 4))
        for i in range(4):
            for j in range(i, 3):
                normal[:, :, i, j] = normal[:, :, j, i] = self._tile_dot(
                    self.basis_w[i], basis[j]
                )
            normal[:, :, i, 3] = normal[:, :, 3, i] = self._tile_sum(self.basis_w[i])
        self._normal_plain = normal
        self._normal_plain_inv = np.linalg.pinv(normal)
        # the joint model's map from its parameters to every tile's (T, Gx, Gy, 1)
        # coefficients: gain and offset affine across the frame, one shift
        self._lift = self._joint_lift(tile_mean)
        self._tile_mean = tile_mean
        self._kappa_sum = 0.0
        self._kappa_n = 0
        self._ref_var = self._tile_dot(weight, var_raw)
        self.noise_scale = 1.0
        """The reference's noise over the noise model's, measured by :meth:`refine`
        from the residuals (1.0 until a frame is fitted)."""
        self._compensate(1.0)
        score = np.linalg.eigvalsh(self._info_tile)[..., 0]
        # a tile without texture in both directions (flat background, a masked
        # or zeroed patch) says nothing about the shift, and its near-zero
        # residual would set the robust scale that rejects the textured tiles
        self._textured = score > 1e-6 * max(float(score.max()), 1e-300)
        band_score = score.sum(axis=1)
        n_bands = max(1, math.ceil(self.coverage * n_ty - 1e-9))
        order = np.argsort(-band_score, kind="stable")
        self.bands = np.sort(order[:n_bands])

    # -- helpers ------------------------------------------------------------------

    def _tile_dot(
        self, a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float64]:
        """Sum over each tile of ``a * b`` (grid-shaped) -> (n_ty, n_tx)."""
        s = self.tile_px
        shape = (a.shape[0] // s, s, a.shape[1] // s, s)
        out = np.einsum("aibj,aibj->ab", a.reshape(shape), b.reshape(shape))
        return np.asarray(out, dtype=np.float64)

    def _tile_sum(self, image: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """Sum over each tile of a grid-shaped image -> (n_ty, n_tx)."""
        s = self.tile_px
        a = np.asarray(image, dtype=np.float32)
        band = a.reshape(a.shape[0] // s, s, a.shape[1]).sum(axis=1, dtype=np.float64)
        return np.asarray(band.reshape(band.shape[0], -1, s).sum(axis=2))

    def _compensate(self, noise_scale: float) -> None:
        """Invert the normal matrices less the reference's noise energy.

        Bias compensation: the noise of the reference (``noise_scale`` times
        the model's) inflates the energy of the template and of its gradients;
        left in, it attenuates the gain, and where the template and its
        gradients correlate, the attenuated gain biases the shift.
        """
        c_t, c_g = self._gains
        normal = self._normal_plain.copy()
        ref_var = noise_scale * self._ref_var
        shrink = np.minimum(
            c_g * ref_var, 0.7 * np.minimum(normal[..., 1, 1], normal[..., 2, 2])
        )
        normal[..., 0, 0] -= np.minimum(c_t * ref_var, 0.7 * normal[..., 0, 0])
        normal[..., 1, 1] -= shrink
        normal[..., 2, 2] -= shrink
        self.normal_inv = np.linalg.pinv(normal)
        # the joint fit weighs each tile by the signal fraction of its gradient
        # energy: its right-hand side's signal over its variance, both from
        # the plain normal matrix; a tile of the reference's noise alone adds
        # only noise (errors in variables)
        plain = self._normal_plain
        energy = plain[..., 1, 1] + plain[..., 2, 2]
        signal = np.maximum(energy - 2.0 * c_g * ref_var, 0.0)
        frac = signal / np.maximum(energy, 1e-300)
        self._tile_frac = frac
        lift = self._lift
        self._joint_normal = frac[..., None, None] * np.einsum(
            "abip,abij,abjq->abpq", lift, normal, lift
        )
        self._joint_var = (frac * frac)[..., None, None] * np.einsum(
            "abip,abij,abjq->abpq", lift, plain, lift
        )
        # information about (row, col) per tile, at unit gain: the Schur
        # complement of the (T, 1) block; pinv: a blank tile (flat, masked,
        # zeroed) carries none
        self._info_tile = np.linalg.pinv(self.normal_inv[..., 1:3, 1:3])

    def _joint_lift(
        self, tile_mean: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """Per tile, the 4 x 6 map from the joint parameters to its coefficients.

        Joint parameters ``(g, cx, cy, o0, ou, ov)``: one gain, the gradients'
        coefficients, and an offset ``o0 + ou u + ov v`` at the tile's centre
        ``(u, v)`` in [-1, 1]. The template's basis is centred per tile, so a
        tile's constant takes ``g`` times its template's mean as well as the
        offset. The gain stays one number: a gain ramp times a blob is that
        blob's gradient (a shift), and it cost a tenth of the precision on cells.
        """
        n_ty, n_tx = self.n_ty, self.n_tx
        v = np.linspace(-1.0, 1.0, n_ty) if n_ty > 1 else np.zeros(1)
        u = np.linspace(-1.0, 1.0, n_tx) if n_tx > 1 else np.zeros(1)
        uu, vv = np.meshgrid(u, v)
        lift = np.zeros((n_ty, n_tx, 4, 6))
        lift[..., 0, 0] = 1.0
        lift[..., 1, 1] = 1.0
        lift[..., 2, 2] = 1.0
        lift[..., 3, 0] = tile_mean
        lift[..., 3, 3] = 1.0
        lift[..., 3, 4] = uu
        lift[..., 3, 5] = vv
        return lift

    def _spans(
        self, ok: npt.NDArray[np.bool_], origin: int, n_tiles: int
    ) -> npt.NDArray[np.int64]:
        """First and last weighted frame index of every tile along one axis."""
        s = self.tile_px
        span = np.full((n_tiles, 2), -1, dtype=np.int64)
        for t in range(n_tiles):
            idx = np.flatnonzero(ok[t * s : (t + 1) * s])
            if idx.size:
                span[t] = (origin + t * s + idx[0], origin + t * s + idx[-1])
        return span

    def _valid_range(
        self, span: npt.NDArray[np.int64], shift: int, size: int
    ) -> tuple[int, int]:
        """Tiles ``[lo, hi)`` whose weighted pixels resample from inside the frame."""
        first = span[:, 0] + shift - self.reach
        last = span[:, 1] + shift - self.reach + self.k_len - 1
        ok = (span[:, 0] >= 0) & (first >= 0) & (last <= size - 1)
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return 0, 0
        # the weighted pixels of inner tiles lie between those of outer ones
        return int(idx[0]), int(idx[-1]) + 1

    @staticmethod
    def _window(
        frame: npt.NDArray[Any], r0: int, r1: int, c0: int, c1: int
    ) -> npt.NDArray[np.float32]:
        """``frame[r0:r1, c0:c1]`` as float32; rows/cols past the edge replicated.

        The replicated pixels only reach pixels that carry no weight.
        """
        height, width = frame.shape
        a, b = max(r0, 0), min(r1, height)
        c, d = max(c0, 0), min(c1, width)
        window = np.asarray(frame[a:b, c:d], dtype=np.float32)
        if (a, b, c, d) == (r0, r1, c0, c1):
            return window
        return np.asarray(
            cv2.copyMakeBorder(
                np.ascontiguousarray(window),
                a - r0,
                r1 - b,
                c - c0,
                c1 - d,
                cv2.BORDER_REPLICATE,
            ),
            dtype=np.float32,
        )

    def _kernel(self, frac: float) -> npt.NDArray[np.float32]:
        return _shift_kernel(frac, self.sigma).astype(np.float32)

    @property
    def fraction(self) -> float:
        """Fraction of the frame's pixels inside the used bands."""
        used = int(self._n_px[self.bands].sum())
        return float(used / (self.shape[0] * self.shape[1]))

    # -- fitting ------------------------------------------------------------------

    def _sums(
        self, frame: npt.NDArray[Any], d_row: float, d_col: float
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """Per-tile weighted sums (T I, Gx I, Gy I, I, I²) at displacement d."""
        s, reach, k_len = self.tile_px, self.reach, self.k_len
        height, width = frame.shape
        r0, c0 = self.origin
        n_row, n_col = math.floor(d_row), math.floor(d_col)
        # tiles whose weighted pixels' sources (plus the kernel's reach) lie
        # inside the frame
        ty_lo, ty_hi = self._valid_range(self._row_span, n_row, height)
        tx_lo, tx_hi = self._valid_range(self._col_span, n_col, width)
        sums = np.zeros((self.n_ty, self.n_tx, 5))
        valid = np.zeros((self.n_ty, self.n_tx), dtype=bool)
        if ty_hi <= ty_lo or tx_hi <= tx_lo:
            return sums, valid
        k_col = self._kernel(d_col - n_col)
        k_row = self._kernel(d_row - n_row)
        ca, cb = tx_lo * s, tx_hi * s
        n_t = tx_hi - tx_lo
        src_c0 = c0 + ca + n_col - reach
        src_c1 = src_c0 + (cb - ca) + k_len - 1
        sums_rows = self._rows

        def prod_w(ra: int, ca: int, cb: int) -> npt.NDArray[np.float32]:
            return self.basis_w[3, ra : ra + s, ca:cb]

        for band in self.bands:
            if not ty_lo <= band < ty_hi:
                continue
            # one band at a time: its products stay in the CPU cache
            ra = int(band) * s
            src_r0 = r0 + ra + n_row - reach
            window = self._window(frame, src_r0, src_r0 + s + k_len - 1, src_c0, src_c1)
            img = _separable(window, k_row, k_col)[:s, : cb - ca]
            # the weighted basis (T, Gx, Gy, 1) times the frame, and the energy,
            # summed down the band's rows in one pass (no product array)
            cols = sums_rows[:, : cb - ca]
            np.einsum(
                "qrc,rc->qc", self.basis_w[:, ra : ra + s, ca:cb], img, out=cols[:4]
            )
            np.einsum("rc,rc->c", prod_w(ra, ca, cb) * img, img, out=cols[4])
            sums[band, tx_lo:tx_hi] = cols.reshape(5, n_t, s).sum(axis=-1).T
            valid[band, tx_lo:tx_hi] = True
        return sums, valid

    def _residual_noise_scale(
        self,
        sums: npt.NDArray[np.float64],
        used: npt.NDArray[np.bool_],
        d_row: float,
        d_col: float,
    ) -> float:
        """Measured noise over the model's, from the tiles' least-squares residuals.

        With weights ``1 / (2 v)`` a tile's residual per pixel is
        ``κ (c_f + a² c_r) / 2``: κ the true variance over the model's ``v``,
        ``c_f`` and ``c_r`` the noise gains of the frame's and the reference's
        resampling kernels, ``a`` the tile's gain. The median over the tiles in
        use is robust to debris. Structure the noise model took for noise (sharp
        spots) makes κ < 1; faint structure it missed, κ > 1.
        """
        coef = np.einsum("abij,abj->abi", self._normal_plain_inv, sums[..., :4])
        resid = sums[..., 4] - np.einsum("abi,abi->ab", coef, sums[..., :4])
        k_row = self._kernel(d_row - math.floor(d_row)).astype(np.float64)
        k_col = self._kernel(d_col - math.floor(d_col)).astype(np.float64)
        c_f = float(np.sum(k_row**2) * np.sum(k_col**2))
        c_r = self._gains[0]
        gain = coef[..., 0]
        kappa = 2.0 * resid / (np.maximum(self._n_px - 4, 1) * (c_f + gain**2 * c_r))
        return float(np.median(kappa[used])) if np.any(used) else math.nan

    def _residual_noise(
        self,
        frame: npt.NDArray[Any],
        sums: npt.NDArray[np.float64],
        used: npt.NDArray[np.bool_],
        d_row: float,
        d_col: float,
    ) -> NoiseModel | None:
        """Fit the noise model to the residuals of ``frame`` fitted at ``d``.

        The frame less the kept tiles' fitted templates leaves the two images'
        noise and none of their structure. Each squared residual, over its
        variance per unit of the model (the frame's and the reference's
        resampling gains ``c_f + a² c_t``, ``a`` the tile's gain, and the
        pixel's leverage in its tile's fit), is regressed on its level (the
        images weighed by the squared resampling taps), see
        :func:`_fit_variance_line`. The single image's estimate
        (:func:`estimate_noise`) cannot tell sharp structure from noise: on
        sparse spots it reads the background's variance 30x too high, which
        flattens the weights.

        Returns
        -------
        NoiseModel or None
            None when fewer than 4 tiles are used, or the residuals are not
            those of noise: zero (the reference against itself), or more than
            2 % of them beyond 3σ (a frame the fit does not explain).
        """
        s, reach, k_len = self.tile_px, self.reach, self.k_len
        if np.count_nonzero(used) < 4:
            return None
        r0, c0 = self.origin
        rows, cols = self.n_ty * s, self.n_tx * s
        n_row, n_col = math.floor(d_row), math.floor(d_col)
        window = self._window(
            frame,
            r0 + n_row - reach,
            r0 + n_row - reach + rows + k_len - 1,
            c0 + n_col - reach,
            c0 + n_col - reach + cols + k_len - 1,
        )
        k_row = self._kernel(d_row - n_row).astype(np.float64)
        k_col = self._kernel(d_col - n_col).astype(np.float64)
        grid = (slice(0, rows), slice(0, cols))
        resampled = _separable(window, k_row, k_col)[grid]
        # the level each residual's variance belongs to: the resampling sums
        # the pixels' variances with the squared taps, so the squared taps,
        # normalised, weigh the level (the blurred level is too wide at sharp
        # spots: too high on their flanks, too low at their peaks)
        k0 = _kernels(self.sigma)[0]
        k0_sq = k0**2 / np.sum(k0**2)
        level_ref = _filtered(self.reference, k0_sq, k0_sq, reach)[
            r0 : r0 + rows, c0 : c0 + cols
        ]
        level_frame = _separable(
            window, k_row**2 / np.sum(k_row**2), k_col**2 / np.sum(k_col**2)
        )[grid]
        coef = np.einsum("abij,abj->abi", self._normal_plain_inv, sums[..., :4])
        c_f = float(np.sum(k_row**2) * np.sum(k_col**2))
        c_t = self._gains[0]
        templ = self._templ
        keep = np.repeat(np.repeat(used, s, axis=0), s, axis=1) & (self._inside > 0)
        idx = np.flatnonzero(keep)
        idx = idx[:: max(1, idx.size // 40_000)]  # a deterministic sparse sample
        row, col = np.divmod(idx, cols)
        tile = (row // s, col // s)
        tc = coef[tile]
        basis = np.stack(
            [
                templ.ravel()[idx] - self._tile_mean[tile],
                self._grad_x.ravel()[idx],
                self._grad_y.ravel()[idx],
                np.ones(idx.size),
            ],
            axis=1,
        )
        model = np.einsum("ni,ni->n", tc, basis)
        # a pixel's leverage in its tile's fit: the few bright pixels of a tile
        # of sparse spots carry most of its four parameters, which absorb half
        # their residual
        leverage = self.basis_w[3].ravel()[idx] * np.einsum(
            "ni,nij,nj->n", basis, self._normal_plain_inv[tile], basis
        )
        w_frame, w_ref = c_f, tc[:, 0] ** 2 * c_t
        scaled = (resampled.ravel()[idx] - model) ** 2 / (
            (w_frame + w_ref) * np.maximum(1.0 - leverage, 0.05)
        )
        level = (
            w_frame * level_frame.ravel()[idx] + w_ref * level_ref.ravel()[idx]
        ) / (w_frame + w_ref)
        fitted = _fit_variance_line(level, scaled.astype(np.float64))
        lo, hi = np.percentile(level, [1.0, 99.0])
        if fitted is None or not float(np.median(scaled)) > 1e-8 * (hi - lo) ** 2:
            # rounding, not noise: the reference against itself
            return None
        return fitted

    def _step(
        self, frame: npt.NDArray[Any], d_row: float, d_col: float
    ) -> _Step | None:
        """One robust Gauss-Newton step from ``d`` (None: no tile to fit)."""
        sums, valid = self._sums(frame, d_row, d_col)
        coef = np.einsum("abij,abj->abi", self.normal_inv, sums[..., :4])
        gain = coef[..., 0]
        resid = sums[..., 4] - np.einsum("abi,abi->ab", coef, sums[..., :4])
        ok = valid & self._textured & (gain > 1e-6)
        n_valid = int(np.count_nonzero(ok))
        if n_valid == 0:
            return None
        chi = resid / np.maximum(self._n_px - 4, 1)
        scale = float(np.median(chi[ok]))
        if scale > 0:
            # something that does not follow the shift (debris, a blob)
            ok &= chi <= 6.0 * scale
        safe = np.where(ok, gain, 1.0)
        # per-tile shift (x, y) and its information (gain² × Schur complement)
        dx_t = coef[..., 1] / safe
        dy_t = coef[..., 2] / safe
        info = self._info_tile * (safe * safe)[..., None, None]
        dx_f = dy_f = 0.0
        cov = np.full((2, 2), np.inf)
        used = ok
        spread = 1.0
        for _ in range(4):
            n_used = int(np.count_nonzero(used))
            if n_used == 0:
                return None
            inf = info[used]
            vx, vy = dx_t[used], dy_t[used]
            a = inf.sum(axis=0)
            rhs = np.array(
                [
                    float(inf[:, 0, 0] @ vx + inf[:, 0, 1] @ vy),
                    float(inf[:, 1, 0] @ vx + inf[:, 1, 1] @ vy),
                ]
            )
            cov = np.linalg.inv(a)
            dx_f, dy_f = (cov @ rhs).tolist()
            # Mahalanobis distance of every tile's shift from the fused one,
            # calibrated by its median (1.386 for two degrees of freedom): the
            # model's noise is only a guide (correlated noise, the reference's
            # own noise), the tiles' scatter is the measurement
            ex, ey = dx_t - dx_f, dy_t - dy_f
            dist2 = (
                ex * ex * info[..., 0, 0]
                + 2.0 * ex * ey * info[..., 0, 1]
                + ey * ey * info[..., 1, 1]
            )
            spread = max(float(np.median(dist2[used])) / 1.386, 1e-6)
            new = ok & (dist2 <= 16.0 * spread)
            if np.array_equal(new, used):
                break
            used = new
        joint = self._joint_shift(sums, used)
        if joint is not None:
            dx_f, dy_f, cov = joint
        cov = cov * spread
        # inverse composition: T(x + Δ) ~ I(x + d)  =>  d <- d - Δ; cov in (row, col)
        cov_rc = np.array([[cov[1, 1], cov[0, 1]], [cov[0, 1], cov[0, 0]]])
        plain = self._normal_plain[used]
        energy = plain[:, 1, 1] + plain[:, 2, 2]
        share = float(
            np.sum(self._tile_frac[used] * energy) / max(float(energy.sum()), 1e-300)
        )
        return _Step(d_row - dy_f, d_col - dx_f, cov_rc, used, n_valid, sums, share)

    def _joint_shift(
        self, sums: npt.NDArray[np.float64], used: npt.NDArray[np.bool_]
    ) -> tuple[float, float, npt.NDArray[np.float64]] | None:
        """Fit the shift (x, y) and its covariance once over the kept tiles.

        The tiles' own gains and offsets (four parameters per tile) absorb the
        part of the gradients that a tile's template or a constant explains: on
        smooth content, where a tile's template is close to a ramp, much of the
        information goes with them. Here one gain and an affine offset serve
        every kept tile, fitted together; the per-tile fits still decide which
        tiles to keep (the covariance is still calibrated by their scatter).
        None: singular.
        """
        lift = self._lift[used]
        a = self._joint_normal[used].sum(axis=0)
        rhs = np.einsum("t,tip,ti->p", self._tile_frac[used], lift, sums[used][:, :4])
        try:
            inv = np.linalg.inv(a)
        except np.linalg.LinAlgError:
            return None
        p = inv @ rhs
        gain = float(p[0])
        # weighted least squares: the sandwich covariance
        sandwich = inv @ self._joint_var[used].sum(axis=0) @ inv.T
        cov = sandwich[1:3, 1:3] / (gain * gain) if gain > 1e-6 else None
        if cov is None or not np.all(np.isfinite(cov)):
            return None
        return float(p[1]) / gain, float(p[2]) / gain, cov

    def refine(
        self,
        frame: npt.NDArray[Any],
        d_row: float,
        d_col: float,
        *,
        max_iter: int = 4,
    ) -> FrameSolution | None:
        """Iterate robust Gauss-Newton steps from ``d`` until the move is below 1e-3 px.

        Parameters
        ----------
        frame : ndarray, shape (H, W)
            Any real dtype; only the used bands are read.
        d_row, d_col : float
            Starting displacement (from the region engine), within ~1 px.
        max_iter : int
            Maximum number of resamplings of the frame (two more when the
            converged fit re-measured :attr:`noise_scale` and moved).

        Returns
        -------
        FrameSolution or None
            None when no tile lies in the overlap or the fit diverges (> 2 px).
        """
        start = (d_row, d_col)
        out: FrameSolution | None = None
        prev: tuple[float, float, float] | None = None  # plain step, its gain
        last_move = 0.0
        recalibrated = False
        n_iter, it = max_iter, 0
        while it < n_iter:
            it += 1
            res = self._step(frame, d_row, d_col)
            if res is None:
                return None
            cov, used = res.cov, int(np.count_nonzero(res.used))
            plain_r, plain_c = res.d_row - d_row, res.d_col - d_col
            at_row, at_col = d_row, d_col
            sigma = math.sqrt(max(0.5 * float(cov[0, 0] + cov[1, 1]), 0.0))
            # the step efficiency left by an imperfect noise compensation
            self.eta = learn_step_efficiency(self.eta, (plain_r, plain_c), prev, sigma)
            gain = min(1.0 / self.eta, 3.0)
            move_r, move_c = gain * plain_r, gain * plain_c
            d_row += move_r
            d_col += move_c
            prev = (plain_r, plain_c, gain)
            if max(abs(d_row - start[0]), abs(d_col - start[1])) > 2.0:
                return None
            move = max(abs(move_r), abs(move_c))
            tol = max(1e-3, 0.25 * sigma)
            if last_move > 0:
                self.contraction = learn_contraction(self.contraction, move, last_move)
                left = error_left_px(move, move / last_move)
            else:
                # the contraction learnt on earlier frames: a start within a
                # fraction of the tolerance over it needs no confirming step
                left = error_left_px(move, self.contraction)
            last_move = move
            out = FrameSolution(
                d_row,
                d_col,
                cov,
                used,
                res.n_valid,
                move < tol or left < LEFT_TOLERANCE * tol,
                res.signal_share,
            )
            if out.converged:
                if not self._noise_learnt:
                    # once, at the first converged fit: the residuals' noise
                    # model replaces the single image's guess
                    self._noise_learnt = True
                    fitted = self._residual_noise(
                        frame, res.sums, res.used, at_row, at_col
                    )
                    if fitted is not None:
                        self.noise = fitted
                        if not (self._auto_sigma and self._choose_sigma()):
                            self._weigh(fitted)
                        n_iter = max(n_iter, it + 2)
                        continue
                if not recalibrated:
                    recalibrated = True
                    # measured once, at the converged step: the residuals there
                    kappa = self._residual_noise_scale(
                        res.sums, res.used, at_row, at_col
                    )
                    if self._learn_noise_scale(kappa):
                        # the compensation moved the fixed point: two more steps
                        n_iter = max(n_iter, it + 2)
                        continue
                break
        return out

    def _learn_noise_scale(self, kappa: float) -> bool:
        """Fold one frame's measured noise scale in; True if the fit changed.

        The running mean over the frames fitted so far sets the compensation
        (:meth:`_compensate`); it is rebuilt when the mean moves by more than
        5 %. Ratios outside [0.05, 20] are ignored: the reference against
        itself or a noiseless copy, or a frame the fit did not explain.
        """
        if not 0.05 <= kappa <= 20.0:
            return False
        self._kappa_sum += kappa
        self._kappa_n += 1
        scale = self._kappa_sum / self._kappa_n
        if abs(scale - self.noise_scale) <= 0.05 * self.noise_scale:
            return False
        self.noise_scale = scale
        self._compensate(scale)
        return True
