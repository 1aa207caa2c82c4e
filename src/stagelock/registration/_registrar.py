"""The Registrar: one reference, many frames, one sub-pixel shift per frame."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from ._match import IntegerMatch, match_in_window
from ._subpixel import GaussNewtonResult, TemplateModel
from ._templates import select_regions
from ._types import ShiftEstimate, Status

__all__ = ["Registrar"]

ReferenceStrategy = Literal["fixed", "keyframe"]


def as_image(array: npt.ArrayLike, name: str = "frame") -> npt.NDArray[np.generic]:
    """Validate a 2-D real image without copying it."""
    image = np.asarray(array)
    if image.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D image (rows, columns); got shape {image.shape}"
        )
    if image.dtype.kind not in "uif" or image.dtype == np.float16:
        raise ValueError(
            f"{name} must be uint8, uint16, int or float32/64; got dtype {image.dtype}"
        )
    if min(image.shape) < 8:
        raise ValueError(f"{name} is too small to register: shape {image.shape}")
    return image


def default_region_size(shape: tuple[int, int]) -> int:
    """Template side: ~1/6 of the short side, a multiple of 8, 24..128 px."""
    side = int(round(min(shape) / 6 / 8)) * 8
    return int(np.clip(side, 24, 128))


@dataclass(frozen=True, slots=True)
class _Key:
    """A reference image prepared for matching, and where it sits."""

    models: tuple[TemplateModel, ...]
    smalls: tuple[npt.NDArray[np.float32], ...]
    offset_row: float
    offset_col: float


class Registrar:
    """Measure the sub-pixel translation of frames against a reference.

    Parameters
    ----------
    reference : ndarray, shape (H, W)
        The reference image (uint8, uint16, int, float32/64). Copied: later changes
        to the caller's array have no effect.
    roi : (x, y, w, h), optional
        Only cut template regions inside this rectangle of the reference.
        Default: anywhere, chosen automatically where the reference has texture.
    max_shift_px : float
        Capture range: the largest displacement searched, per axis.
    n_regions : int
        Number of template regions; their estimates are checked against each
        other so a region hit by debris or bleaching is outvoted.
    region_size_px : int, optional
        Side of each template region; default ~1/6 of the short image side
        (24..128 px).
    reference_strategy : {"fixed", "keyframe"}
        ``"fixed"``: always match against ``reference``. ``"keyframe"``: when the
        confidence of a good measurement falls below ``keyframe_below``, the frame
        becomes the new reference and later shifts are chained through it, so the
        reported shift stays relative to the original reference while the sample
        changes over hours.
    min_confidence : float
        Below this, a found shift is reported as ``Status.LOW_CONFIDENCE``.
    keyframe_below : float
        Confidence that triggers a new key frame (``"keyframe"`` strategy only).
    saturation_level : float, optional
        Pixel value treated as saturated; default the dtype's maximum for integer
        images, none for floats.
    max_saturated_fraction : float
        Frames with more saturated pixels than this are reported as
        ``Status.SATURATED``.

    Notes
    -----
    Per frame, each region is found by normalised cross-correlation (TM_CCOEFF_NORMED)
    over ±``max_shift_px`` on a reduced copy of its search window (coarse), the
    regions vote on the displacement, each region is matched again at full
    resolution around the winning displacement (fine), and a Gauss-Newton
    refinement with exact Lanczos sub-pixel shifts [1]_ removes the pixel-locking
    bias of peak fitting. The regions' estimates are fused with their
    inverse covariances after rejecting those that disagree with the median.
    Only the search windows are read from the frame, so the cost does not grow
    with the frame size.

    References
    ----------
    .. [1] S. Baker and I. Matthews, "Lucas-Kanade 20 years on: a unifying
       framework", IJCV 56(3), 221-255 (2004), :doi:`10.1023/B:VISI.0000011205.11775.fd`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.random((128, 128)).astype(np.float32)
    >>> frame = np.roll(ref, (2, -3), axis=(0, 1))  # content moves down 2, left 3
    >>> est = Registrar(ref, max_shift_px=8).measure(frame)
    >>> round(est.dx_px, 3), round(est.dy_px, 3), est.status.value
    (-3.0, 2.0, 'ok')
    """

    def __init__(
        self,
        reference: npt.ArrayLike,
        *,
        roi: tuple[int, int, int, int] | None = None,
        max_shift_px: float = 50.0,
        n_regions: int = 9,
        region_size_px: int | None = None,
        reference_strategy: ReferenceStrategy = "fixed",
        min_confidence: float = 0.25,
        keyframe_below: float = 0.6,
        saturation_level: float | None = None,
        max_saturated_fraction: float = 0.05,
    ) -> None:
        image = as_image(reference, "reference")
        if not max_shift_px > 0:
            raise ValueError(f"max_shift_px must be > 0; got {max_shift_px}")
        if n_regions < 1:
            raise ValueError(f"n_regions must be >= 1; got {n_regions}")
        if reference_strategy not in ("fixed", "keyframe"):
            raise ValueError(
                "reference_strategy must be 'fixed' or 'keyframe'; "
                f"got {reference_strategy!r}"
            )
        height, width = image.shape
        if roi is not None:
            x, y, w, h = (int(v) for v in roi)
            if w < 8 or h < 8 or x < 0 or y < 0 or x + w > width or y + h > height:
                raise ValueError(
                    f"roi (x={x}, y={y}, w={w}, h={h}) must lie inside the "
                    f"{width}x{height} image and be at least 8x8 px"
                )
            roi = (x, y, w, h)
        size = region_size_px or default_region_size(image.shape)
        if size < 8:
            raise ValueError(f"region_size_px must be >= 8; got {size}")
        self.shape: tuple[int, int] = (height, width)
        self.dtype = image.dtype
        self.roi = roi
        self.max_shift_px = float(max_shift_px)
        self.n_regions = int(n_regions)
        self.region_size_px = int(min(size, height, width))
        self.reference_strategy: ReferenceStrategy = reference_strategy
        self.min_confidence = float(min_confidence)
        self.keyframe_below = float(keyframe_below)
        if saturation_level is None and image.dtype.kind in "ui":
            saturation_level = float(np.iinfo(image.dtype).max)
        self.saturation_level = saturation_level
        self.max_saturated_fraction = float(max_saturated_fraction)
        self._scale = self._coarse_scale()
        self._key = self._prepare(image, 0.0, 0.0)
        if not self._key.models:
            raise ValueError("the reference has no texture to register against")

    # -- reference handling -------------------------------------------------------

    def _coarse_scale(self) -> int:
        """Reduction factor of the coarse search: keep >= 16 px templates."""
        if self.max_shift_px <= 6:
            return 1
        return int(max(1, min(4, self.region_size_px // 16, self.max_shift_px // 3)))

    def _prepare(self, image: npt.NDArray[np.generic], off_row: float, off_col: float) -> _Key:
        ref32 = np.array(image, dtype=np.float32)  # a private copy
        regions = select_regions(
            ref32, n_regions=self.n_regions, size_px=self.region_size_px, roi=self.roi
        )
        models = []
        for region in regions:
            model = TemplateModel(ref32, region.row, region.col, region.size_px)
            if model.texture > 0:
                models.append(model)
        smalls = tuple(self._reduce(m.patch) for m in models)
        return _Key(tuple(models), smalls, off_row, off_col)

    def _reduce(self, patch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        import cv2

        s = self._scale
        if s == 1:
            return patch
        n = patch.shape[0] // s
        small: npt.NDArray[np.float32] = cv2.resize(
            patch[: n * s, : n * s], (n, n), interpolation=cv2.INTER_AREA
        )
        return small

    @property
    def regions(self) -> list[tuple[int, int, int]]:
        """Template regions of the current reference as ``(x, y, size_px)``."""
        return [(m.col, m.row, m.size) for m in self._key.models]

    def set_reference(self, reference: npt.ArrayLike) -> None:
        """Replace the reference; later shifts are relative to the new one."""
        image = as_image(reference, "reference")
        self._check_shape(image)
        key = self._prepare(image, 0.0, 0.0)
        if not key.models:
            raise ValueError("the reference has no texture to register against")
        self._key = key

    @classmethod
    def from_frames(cls, frames: Sequence[npt.ArrayLike] | npt.NDArray[np.generic], **kwargs: object) -> Registrar:
        """Build a registrar whose reference is the mean of ``frames``.

        Averaging N frames divides the reference's noise by √N; use it when the
        sample is still during the first frames.
        """
        stack = [as_image(f, "frame") for f in frames]
        if not stack:
            raise ValueError("from_frames needs at least one frame")
        mean = np.mean(np.stack(stack).astype(np.float64), axis=0).astype(np.float32)
        return cls(mean, **kwargs)  # type: ignore[arg-type]

    def _check_shape(self, image: npt.NDArray[np.generic]) -> None:
        if image.shape != self.shape:
            raise ValueError(
                f"frame shape {image.shape} differs from the reference shape {self.shape}"
            )

    # -- measurement --------------------------------------------------------------

    def _screen(self, frame: npt.NDArray[np.generic]) -> Status | None:
        """Cheap whole-frame checks on a sparse sample of pixels."""
        step = max(1, int(math.sqrt(frame.size / 65536)))
        sample = frame[::step, ::step]
        if sample.dtype.kind == "f" and not np.isfinite(sample).all():
            return Status.BLANK
        lo, hi = float(sample.min()), float(sample.max())
        if hi - lo <= 1e-6 * max(abs(hi), abs(lo), 1.0):
            return Status.BLANK
        if self.saturation_level is not None:
            frac = float(np.count_nonzero(sample >= self.saturation_level)) / sample.size
            if frac > self.max_saturated_fraction:
                return Status.SATURATED
        return None

    def measure(self, frame: npt.ArrayLike) -> ShiftEstimate:
        """Measure the displacement of ``frame`` relative to the reference.

        Parameters
        ----------
        frame : ndarray, shape (H, W)
            Same shape as the reference; any real dtype. Not modified.

        Returns
        -------
        ShiftEstimate
            ``dx_px``/``dy_px`` (NaN unless ``status`` has a shift), confidence and
            status.

        Raises
        ------
        ValueError
            If ``frame`` is not 2-D or its shape differs from the reference.
        """
        image = as_image(frame)
        self._check_shape(image)
        bad = self._screen(image)
        if bad is not None:
            return ShiftEstimate.failed(bad)
        key = self._key
        estimate = self._measure_key(image, key)
        if self.reference_strategy == "keyframe" and estimate.status.has_shift:
            if estimate.status is Status.OK and estimate.confidence < self.keyframe_below:
                # re-anchor on this frame; its offset chains to the original reference
                new_key = self._prepare(image, estimate.dy_px, estimate.dx_px)
                if new_key.models:
                    self._key = new_key
        return estimate

    def _measure_key(self, frame: npt.NDArray[np.generic], key: _Key) -> ShiftEstimate:
        models = key.models
        # displacements are searched relative to the key frame: a frame resembles
        # the key frame most where it sits close to it
        radius = int(math.ceil(self.max_shift_px))
        coarse: list[IntegerMatch | None] = [
            match_in_window(
                frame,
                m.patch,
                m.row,
                m.col,
                centre_row=0,
                centre_col=0,
                radius_px=radius,
                scale=self._scale,
                template_small=small,
            )
            for m, small in zip(models, key.smalls)
        ]
        found = [c for c in coarse if c is not None]
        if not found or max(c.ncc for c in found) < 0.05:
            return ShiftEstimate.failed(Status.NO_PEAK)
        centre_row, centre_col = _vote(found, tol=self._scale + 1.0)

        fine_radius = self._scale + 1 if self._scale > 1 else 0
        refined: list[GaussNewtonResult] = []
        for m in models:
            start_row, start_col = float(centre_row), float(centre_col)
            if fine_radius:
                fine = match_in_window(
                    frame,
                    m.patch,
                    m.row,
                    m.col,
                    centre_row=round(centre_row),
                    centre_col=round(centre_col),
                    radius_px=fine_radius,
                )
                if fine is None or fine.at_edge:
                    continue
                start_row, start_col = fine.d_row, fine.d_col
            result = m.refine(frame, start_row, start_col)
            if result is None:
                continue
            refined.append(result)
        if not refined:
            return ShiftEstimate.failed(Status.NO_PEAK)
        return self._fuse(refined, len(models), key)

    def _fuse(self, results: list[GaussNewtonResult], n_models: int, key: _Key) -> ShiftEstimate:
        rows = np.array([r.d_row for r in results])
        cols = np.array([r.d_col for r in results])
        med_row, med_col = float(np.median(rows)), float(np.median(cols))
        sig = np.array([math.sqrt(max(r.cov[0, 0] + r.cov[1, 1], 0.0)) for r in results])
        # agree = within 0.3 px of the median, or within 4σ for noisy regions
        tol = np.maximum(0.3, 4.0 * sig)
        dist = np.hypot(rows - med_row, cols - med_col)
        inliers = [r for r, d, t in zip(results, dist, tol) if d <= t and r.ncc > 0]
        if not inliers:
            return ShiftEstimate.failed(Status.NO_PEAK)
        info = np.zeros((2, 2))
        acc = np.zeros(2)
        for r in inliers:
            w = np.linalg.pinv(r.cov + 1e-12 * np.eye(2))
            info += w
            acc += w @ np.array([r.d_row, r.d_col])
        cov = np.linalg.pinv(info)
        d_row, d_col = (cov @ acc).tolist()
        nccs = np.array([r.ncc for r in inliers])
        confidence = float(np.clip(np.median(nccs), 0.0, 1.0)) * len(inliers) / n_models
        total_row = d_row + key.offset_row
        total_col = d_col + key.offset_col
        if max(abs(total_row), abs(total_col)) > self.max_shift_px:
            return ShiftEstimate.failed(Status.OUT_OF_RANGE, confidence)
        status = Status.OK if confidence >= self.min_confidence else Status.LOW_CONFIDENCE
        sigma = float(math.sqrt(max(0.5 * (cov[0, 0] + cov[1, 1]), 0.0)))
        return ShiftEstimate(total_col, total_row, confidence, status, len(inliers), sigma)


def _vote(matches: list[IntegerMatch], tol: float) -> tuple[float, float]:
    """Displacement most regions agree on (ties: highest summed correlation)."""
    best_key = (-1, -math.inf)
    best = (matches[0].d_row, matches[0].d_col)
    for m in matches:
        support = [
            o
            for o in matches
            if abs(o.d_row - m.d_row) <= tol and abs(o.d_col - m.d_col) <= tol
        ]
        score = (len(support), sum(o.ncc for o in support))
        if score > best_key:
            best_key = score
            best = (
                float(np.median([o.d_row for o in support])),
                float(np.median([o.d_col for o in support])),
            )
    return best
