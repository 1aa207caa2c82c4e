"""The Registrar: one reference, many frames, one sub-pixel shift per frame.

Size: over 600 lines because the Registrar holds one prepared reference whose
search, tracking, fit and verification steps share its precomputed state.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from ._fullframe import FrameFit, FrameSolution
from ._match import IntegerMatch, match_in_window
from ._subpixel import (
    LEFT_TOLERANCE,
    RegionFit,
    RegionStack,
    error_left_px,
    learn_contraction,
    learn_step_efficiency,
)
from ._templates import select_regions
from ._types import ShiftEstimate, Status
from ._verify import (
    better_alternative,
    overlap_agreement,
    overview,
    overview_factor,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Registrar"]

ReferenceStrategy = Literal["fixed", "keyframe", "previous"]


def as_image(array: npt.ArrayLike, name: str = "frame") -> npt.NDArray[Any]:
    """Validate a 2-D real image without copying it."""
    image = np.asarray(array)
    if image.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D image (rows, columns); got shape {image.shape}"
        )
    if image.dtype.kind not in "uif":
        raise ValueError(
            f"{name} must be uint8, uint16, int or float16/32/64; got dtype "
            f"{image.dtype}"
        )
    if image.dtype == np.float16:
        # OpenCV has no float16 filters or matching: one float32 copy
        image = image.astype(np.float32)
    if min(image.shape) < 16:
        raise ValueError(f"{name} is too small to register: shape {image.shape}")
    return image


def default_region_size(shape: tuple[int, ...]) -> int:
    """Template side: ~1/6 of the short side, a multiple of 8, 16..128 px."""
    side = round(min(shape) / 6 / 8) * 8
    return int(np.clip(side, 16, 128))


@dataclass(frozen=True, slots=True)
class _Key:
    """A reference image prepared for matching, and where it sits."""

    stack: RegionStack
    smalls: tuple[npt.NDArray[np.float32], ...]
    offset_row: float
    offset_col: float
    frame_fit: FrameFit | None = None
    overview: npt.NDArray[np.float32] | None = None


MIN_AGREEMENT = 0.3
"""Overlap agreement (:func:`._verify.overlap_agreement`) below which a shift
found by the search is not reported ``ok``."""

FALLBACK_STICKY_FRAMES = 3
"""Consecutive escalated frames after which the default regions measure first."""

FALLBACK_RETRY_FIRST = 8
"""Then after this many frames the shrunk regions are tried again; each failed
retry doubles the wait, up to :data:`FALLBACK_RETRY_MAX` frames."""

FALLBACK_RETRY_MAX = 64

_ESCALATE = frozenset({Status.LOW_CONFIDENCE, Status.NO_PEAK, Status.OUT_OF_RANGE})
"""Statuses of shrunk regions that send a frame to the default regions."""

MAX_OK_SIGMA_PX = 0.125
"""Largest uncertainty (per axis) of a shift reported ``ok``: at 4σ = 0.5 px a
2-D Gaussian error passes 0.5 px in 3 of 10,000 frames."""

SHRUNK_OK_SIGMA_PX = MAX_OK_SIGMA_PX / 2
"""Largest uncertainty of an ``ok`` shift from regions shrunk to a small coverage
before the default regions measure the frame again: 16-24 px squares of a faint
sample under-read their own uncertainty by up to 3x on the first frames (before
their scatter has calibrated it), which put a dim cell's frame 0.52 px off at
σ = 0.09 px."""


def region_coverage(
    shape: tuple[int, int], n_regions: int, region_size_px: int
) -> float:
    """Fraction of a frame that ``n_regions`` square regions of that side cover."""
    return min(1.0, n_regions * region_size_px**2 / float(shape[0] * shape[1]))


@dataclass(frozen=True, slots=True)
class _Solution:
    """Fused displacement of the agreeing regions (relative to the key frame)."""

    d_row: float
    d_col: float
    cov: npt.NDArray[np.float64]
    median_ncc: float
    n_inliers: int
    n_valid: int
    converged: bool = False
    spread_var: float = math.inf
    """Variance of the fused shift from the regions' scatter (px², both axes)."""
    reduced_chi2: float = math.nan
    """The regions' scatter about the fused shift in units of their covariances,
    per degree of freedom (the Birge ratio: 1 when the covariances are right)."""

    @property
    def confidence(self) -> float:
        ncc = float(np.clip(self.median_ncc, 0.0, 1.0))
        return ncc * self.n_inliers / max(self.n_valid, 1)


class _RunningMedian:
    """Median of the last ``window`` values (1.0 before any).

    A median, not a mean: a frame with debris in one region scatters the
    regions a hundredfold and would hold a mean up for many frames.
    """

    def __init__(self, window: int) -> None:
        self._values: deque[float] = deque(maxlen=window)
        self.value = 1.0

    def add(self, x: float) -> None:
        self._values.append(x)
        self.value = _median(np.fromiter(self._values, dtype=np.float64))


@dataclass
class _Trial:
    """The unblurred candidate and the noise of both fits on the first frames."""

    stack: RegionStack
    n_frames: int = 5
    main_var: list[float] = field(default_factory=list)
    alt_var: list[float] = field(default_factory=list)


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
        (16..128 px).
    reference_strategy : {"fixed", "keyframe", "previous"}
        ``"fixed"``: always match against ``reference``. ``"keyframe"``: when the
        confidence of a good measurement falls below ``keyframe_below``, the frame
        becomes the new reference and later shifts are chained through it, so the
        reported shift stays relative to the original reference while the sample
        changes over hours. ``"previous"``: every measured frame becomes the
        reference of the next (StackReg-style chaining; the errors of the links
        add up as a random walk, so use it only when the sample changes from
        frame to frame); shifts stay relative to ``reference``.
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
    smooth_sigma_px : float or "auto"
        Gaussian pre-filter (px) of both the reference and the frames before the
        sub-pixel fit; 0 disables it (Lanczos-4 resampling instead). σ = 1 px
        halves the error at low signal on smooth samples (the noise dominates
        their highest frequencies in both images) and, because the blur and the
        sub-pixel shift are one exactly sampled Gaussian kernel, has no
        interpolation bias at all; on sharp sparse samples (beads, stars) the
        blur discards signal. ``"auto"`` (default) starts at 1 px and, on the
        first five good frames, also runs the unblurred fit, keeping it only if
        the scatter of the regions' estimates shows it clearly less noisy.
    coverage : float, optional
        Fraction of the frame used by the sub-pixel fit, 0 < coverage <= 1 (1.0: every
        pixel of the overlap). Up to what the regions cover (``n_regions`` squares of
        ``region_size_px``), the regions shrink to that fraction: faster, noisier; a
        frame they cannot trust (not ``ok``, or σ above :data:`SHRUNK_OK_SIGMA_PX`) is
        measured again by the default regions (built on first need; after 3 such frames
        in a row they measure first and the shrunk ones are retried after 8, 16, ... 64
        frames), so a faint frame costs the default's time, not its error. Above, the
        regions only capture and check the shift and a noise-weighted, robust fit over
        the most informative bands of tiles of the frame
        (:class:`~._fullframe.FrameFit`) gives the number: slower, down to the
        Cramér-Rao bound of the covered pixels. Default None: the regions alone at their
        default size (~1/6 of the short side, <= 128 px: ~25 % of a 512² frame, 3.5 % of
        a 2048² one), today's speed. Deterministic: the covered pixels depend on the
        reference only. Ignored above the regions' share when ``roi`` is given (the
        regions then cover the fraction they can inside it).

    Notes
    -----
    Template regions are placed where the reference's structure tensor has a large
    smaller eigenvalue (texture in both directions), without overlap. Per frame:

    1. *Fast path.* Drift between frames is small, so all regions are refined
       jointly by Gauss-Newton from the previous frame's displacement. Accepted
       when it converges nearby, most regions agree, and they correlate at least
       80 % as well as on the previous frame (a jump lands in a poorer optimum).
    2. *Search* (first frame, or the fast path refused). Each region is found by
       normalised cross-correlation (TM_CCOEFF_NORMED, Lewis [2]_) over
       ±``max_shift_px`` on a reduced copy of its search window, the regions vote
       on the displacement, then each is matched again at full resolution around
       the winner, and the Gauss-Newton refinement runs from there.

    The refinement is inverse-compositional (Baker & Matthews [1]_) with a gain
    and offset per region and exact Lanczos sub-pixel resampling, which removes
    the pixel-locking bias of peak fitting. Each iteration keeps the regions that
    agree with the median (within 0.3 px or 4σ) and fuses them with their
    inverse covariances. Only the regions' windows are read from the frame, so
    the cost barely grows with the frame size.

    Not thread-safe: use one Registrar per thread.

    References
    ----------
    .. [1] S. Baker and I. Matthews, "Lucas-Kanade 20 years on: a unifying
       framework", IJCV 56(3), 221-255 (2004),
       :doi:`10.1023/B:VISI.0000011205.11775.fd`.
    .. [2] J. P. Lewis, "Fast normalized cross-correlation", Vision Interface
       1995, 120-123.

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
        smooth_sigma_px: float | Literal["auto"] = "auto",
        coverage: float | None = None,
    ) -> None:
        image = as_image(reference, "reference")
        if coverage is not None and not (
            isinstance(coverage, (int, float)) and 0 < coverage <= 1
        ):
            raise ValueError(f"coverage must be in (0, 1]; got {coverage!r}")
        if not max_shift_px > 0:
            raise ValueError(f"max_shift_px must be > 0; got {max_shift_px}")
        if n_regions < 1:
            raise ValueError(f"n_regions must be >= 1; got {n_regions}")
        if reference_strategy not in ("fixed", "keyframe", "previous"):
            raise ValueError(
                "reference_strategy must be 'fixed', 'keyframe' or 'previous'; "
                f"got {reference_strategy!r}"
            )
        height, width = image.shape
        if roi is not None:
            x, y, w, h = (int(v) for v in roi)
            if w < 16 or h < 16 or x < 0 or y < 0 or x + w > width or y + h > height:
                raise ValueError(
                    f"roi (x={x}, y={y}, w={w}, h={h}) must lie inside the "
                    f"{width}x{height} image and be at least 16x16 px"
                )
            roi = (x, y, w, h)
        area_shape = image.shape if roi is None else (roi[3], roi[2])
        size = region_size_px or default_region_size(area_shape)
        share = region_coverage(area_shape, n_regions, size)
        self.coverage = None if coverage is None else float(coverage)
        # the whole-frame fit runs when the coverage asks for more than the
        # regions hold; below, the regions shrink to the coverage
        self._frame_coverage: float | None = None
        if coverage is not None and region_size_px is None:
            if coverage <= share:
                pixels = coverage * area_shape[0] * area_shape[1] / n_regions
                size = int(max(16, math.floor(math.sqrt(pixels) / 4) * 4))
            elif roi is None:
                self._frame_coverage = float(coverage)
        elif coverage is not None and coverage > share and roi is None:
            self._frame_coverage = float(coverage)
        # regions shrunk to a small coverage: a frame they cannot measure to
        # 0.5 px is measured again by the default regions (see measure())
        self._shrunk = coverage is not None and size < min(
            default_region_size(area_shape), height, width
        )
        if size < 8:
            raise ValueError(f"region_size_px must be >= 8; got {size}")
        self.shape: tuple[int, int] = (height, width)
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
        if smooth_sigma_px != "auto" and not (
            isinstance(smooth_sigma_px, (int, float)) and smooth_sigma_px >= 0
        ):
            raise ValueError(
                "smooth_sigma_px must be 'auto' or a number >= 0; "
                f"got {smooth_sigma_px!r}"
            )
        self.smooth_sigma_px = smooth_sigma_px
        # the pre-filter in use: 1 px under "auto" until the trial decides
        self._sigma = 1.0 if smooth_sigma_px == "auto" else float(smooth_sigma_px)
        self._scale = self._coarse_scale()
        self._track: tuple[float, float, float] | None = None
        # displacement expected when searching: the last good one (relative to
        # the key frame), zero at first
        self._prior = (0.0, 0.0)
        self._trial: _Trial | None = None
        self._trial_done = False  # the pre-filter is chosen once per Registrar
        # the regions' scatter over their Gauss-Newton variance (the Birge
        # ratio), its median over the last frames (see _region_sigma)
        self._scatter_ratio = _RunningMedian(window=20)
        self._key = self._prepare(image, 0.0, 0.0)
        self._fallback: Registrar | None = None
        self._fallback_run = 0  # consecutive frames the default regions measured
        self._retry_every = FALLBACK_RETRY_FIRST // 2
        self._retry_at = FALLBACK_STICKY_FRAMES + FALLBACK_RETRY_FIRST
        self._fallback_options: dict[str, Any] = {
            "roi": roi,
            "max_shift_px": max_shift_px,
            "n_regions": n_regions,
            "reference_strategy": reference_strategy,
            "min_confidence": min_confidence,
            "keyframe_below": keyframe_below,
            "saturation_level": saturation_level,
            "max_saturated_fraction": max_saturated_fraction,
            "smooth_sigma_px": smooth_sigma_px,
        }
        self._reference = image if self._shrunk else None

    # -- reference handling -------------------------------------------------------

    def _coarse_scale(self) -> int:
        """Reduction factor of the coarse search: keep >= 16 px templates."""
        if self.max_shift_px <= 6:
            return 1
        return int(max(1, min(4, self.region_size_px // 16, self.max_shift_px // 3)))

    def _prepare(self, image: npt.NDArray[Any], off_row: float, off_col: float) -> _Key:
        ref32 = np.array(image, dtype=np.float32)  # a private copy
        if not np.isfinite(ref32).all():
            raise ValueError("the reference contains NaN or infinite values")
        regions = select_regions(
            ref32,
            n_regions=self.n_regions,
            size_px=self.region_size_px,
            roi=self._placement_area(),
        )
        size = regions[0].size_px
        sigma = self._sigma
        stack = RegionStack(ref32, [(r.row, r.col) for r in regions], size, sigma)
        keep = [
            (r.row, r.col)
            for r, t in zip(regions, stack.texture, strict=False)
            if t > 1e-12
        ]
        if not keep:
            raise ValueError("the reference has no texture to register against")
        if len(keep) < len(regions):
            stack = RegionStack(ref32, keep, size, sigma)
        smalls = tuple(self._reduce(p) for p in stack.patches)
        self._track = None
        self._prior = (0.0, 0.0)
        if self.smooth_sigma_px == "auto" and not self._trial_done:
            # σ = 1 px until the trial shows the unblurred fit is clearly better
            self._trial = _Trial(RegionStack(ref32, keep, size, 0.0))
        return _Key(
            stack,
            smalls,
            off_row,
            off_col,
            self._frame_fit(ref32),
            overview(ref32, overview_factor(ref32.shape)),
        )

    def _placement_area(self) -> tuple[int, int, int, int] | None:
        """Where regions may be cut: the ROI (or frame) less a margin at the frame edge.

        A region within the resampling kernel's reach of the edge can never be
        sampled, and one a few pixels further in is lost at the first drift
        towards that edge. The margin keeps room for the kernel plus a quarter
        of a region of drift (at most the capture range); where that leaves no
        room for a region, the whole area is used.
        """
        height, width = self.shape
        x, y, w, h = self.roi if self.roi is not None else (0, 0, width, height)
        size = self.region_size_px
        drift = min(math.ceil(self.max_shift_px), max(4, size // 4))
        margin = RegionStack.reach_px(self._sigma) + 1 + drift
        x0, y0 = max(x, margin), max(y, margin)
        x1, y1 = min(x + w, width - margin), min(y + h, height - margin)
        if x1 - x0 < size or y1 - y0 < size:
            return self.roi
        return (x0, y0, x1 - x0, y1 - y0)

    def _frame_fit(self, ref32: npt.NDArray[np.float32]) -> FrameFit | None:
        if self._frame_coverage is None:
            return None
        # under "auto" the frame fit chooses its pre-filter from the
        # reference's spectrum once its first frame has measured the noise
        # (FrameFit); never unblurred: Lanczos-4's systematic error is above
        # the bound of bright samples
        sigma: float | Literal["auto"] = (
            "auto" if self.smooth_sigma_px == "auto" else float(self.smooth_sigma_px)
        )
        return FrameFit(ref32, coverage=self._frame_coverage, smooth_sigma_px=sigma)

    def _reduce(self, patch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        s = self._scale
        if s == 1:
            return patch
        n = patch.shape[0] // s
        small: npt.NDArray[Any] = cv2.resize(
            patch[: n * s, : n * s], (n, n), interpolation=cv2.INTER_AREA
        )
        return small

    @property
    def regions(self) -> list[tuple[int, int, int]]:
        """Template regions of the current reference as ``(x, y, size_px)``."""
        st = self._key.stack
        return [
            (int(c), int(r), st.size) for r, c in zip(st.rows, st.cols, strict=False)
        ]

    def set_reference(self, reference: npt.ArrayLike) -> None:
        """Replace the reference; later shifts are relative to the new one.

        Raises
        ------
        ValueError
            If the image's shape differs or it has no texture.
        """
        image = as_image(reference, "reference")
        self._check_shape(image)
        self._key = self._prepare(image, 0.0, 0.0)
        self._fallback = None
        self._fallback_run = 0
        self._retry_every = FALLBACK_RETRY_FIRST // 2
        self._retry_at = FALLBACK_STICKY_FRAMES + FALLBACK_RETRY_FIRST
        if self._shrunk:
            self._reference = image

    @classmethod
    def from_frames(
        cls, frames: Sequence[npt.ArrayLike] | npt.NDArray[Any], **kwargs: Any
    ) -> Registrar:
        """Build a registrar whose reference is the mean of ``frames``.

        Averaging N frames divides the reference's noise by √N; use it when the
        sample is still during the first frames.
        """
        stack = [as_image(f, "frame") for f in frames]
        if not stack:
            raise ValueError("from_frames needs at least one frame")
        shapes = {f.shape for f in stack}
        if len(shapes) > 1:
            raise ValueError(f"frames have different shapes: {sorted(shapes)}")
        mean = np.mean(np.stack(stack).astype(np.float64), axis=0).astype(np.float32)
        return cls(mean, **kwargs)

    def _check_shape(self, image: npt.NDArray[Any]) -> None:
        if image.shape != self.shape:
            raise ValueError(
                f"frame shape {image.shape} differs from the reference shape "
                f"{self.shape}"
            )

    # -- measurement --------------------------------------------------------------

    def _screen(self, frame: npt.NDArray[Any]) -> Status | None:
        """Cheap whole-frame checks on a sparse sample of pixels."""
        step = max(1, int(math.sqrt(frame.size / 16384)))
        sample = frame[::step, ::step]
        if sample.dtype.kind == "f" and not np.isfinite(sample).all():
            return Status.BLANK
        lo, hi = float(sample.min()), float(sample.max())
        if hi - lo <= 1e-6 * max(abs(hi), abs(lo), 1.0):
            return Status.BLANK
        if self.saturation_level is not None:
            n_sat = np.count_nonzero(sample >= self.saturation_level)
            if n_sat > self.max_saturated_fraction * sample.size:
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
        if self._shrunk and self._fallback_run >= FALLBACK_STICKY_FRAMES:
            # the shrunk regions failed the last frames: the default regions
            # measure, and the shrunk ones are retried every few frames
            self._fallback_run += 1
            if self._fallback_run < self._retry_at:
                assert self._fallback is not None
                return self._fallback.measure(image)
            # a retry; if it fails too, the next one waits twice as long
            self._retry_every = min(2 * self._retry_every, FALLBACK_RETRY_MAX)
            self._retry_at = self._fallback_run + self._retry_every
        estimate = self._measure_key(image, self._key)
        if self._shrunk:
            if estimate.status in _ESCALATE or (
                estimate.ok and not estimate.sigma_px <= SHRUNK_OK_SIGMA_PX
            ):
                estimate = self._escalate(image, estimate)
                self._fallback_run = max(self._fallback_run, 0) + 1
            else:
                self._fallback_run = 0
                self._retry_every = FALLBACK_RETRY_FIRST // 2
                self._retry_at = FALLBACK_STICKY_FRAMES + FALLBACK_RETRY_FIRST
        if (
            self.reference_strategy == "keyframe"
            and estimate.status is Status.OK
            and estimate.confidence < self.keyframe_below
        ) or (self.reference_strategy == "previous" and estimate.status.has_shift):
            # re-anchor on this frame; its offset chains to the original reference
            try:
                self._key = self._prepare(image, estimate.dy_px, estimate.dx_px)
            except ValueError:
                pass  # no texture in this frame: keep the old key frame
        return estimate

    def _escalate(
        self, frame: npt.NDArray[Any], estimate: ShiftEstimate
    ) -> ShiftEstimate:
        """Measure ``frame`` again with the default regions; the better answer.

        Regions shrunk to a small coverage are fast on textured, bright frames
        and lost on faint or smooth ones (16 px squares of a dim cell: shifts
        px off). Their untrusted frames get the default regions' measurement,
        built on first need from the same reference: the setting stays as
        fast where it suffices and as accurate as the default elsewhere, and
        which frames escalate depends on the data only.
        """
        if self._fallback is None:
            assert self._reference is not None
            self._fallback = Registrar(self._reference, **self._fallback_options)
        second = self._fallback.measure(frame)
        if second.ok or (second.status.has_shift and not estimate.ok):
            return second
        return estimate

    def _measure_key(self, frame: npt.NDArray[Any], key: _Key) -> ShiftEstimate:
        solution: _Solution | None = None
        track = self._track
        if track is not None:
            # fast path: refine from the last displacement; a jump lands in a
            # poorer local optimum, caught by the agreement and correlation tests
            solution = self._refine(frame, key.stack, track[0], track[1])
            if solution is not None and not (
                solution.converged
                and solution.n_inliers * 2 >= solution.n_valid
                and abs(solution.d_row - track[0]) <= 2.0
                and abs(solution.d_col - track[1]) <= 2.0
                and solution.median_ncc >= 0.8 * track[2]
            ):
                solution = None
        if solution is None:
            start = self._search(frame, key)
            if isinstance(start, Status):
                self._track = None
                return ShiftEstimate.failed(start)
            solution = self._refine(frame, key.stack, start[0], start[1])
            searched = True
        else:
            searched = False
        if solution is None:
            self._track = None
            return ShiftEstimate.failed(Status.NO_PEAK)
        confidence = solution.confidence
        d_row, d_col = solution.d_row, solution.d_col
        sigma = self._region_sigma(solution, min(key.stack.eta, key.stack.signal_share))
        n_used = solution.n_inliers
        trusted = confidence >= self.min_confidence
        if key.frame_fit is not None:
            fine = key.frame_fit.refine(frame, d_row, d_col)
            if fine is None or not _agrees(fine, solution):
                # the regions and the frame disagree: neither is trusted
                trusted = False
            else:
                # the fit's covariance allows for the reference's noise down to
                # a signal share of 0.3 (its compensation's cap); below, the
                # template is mostly noise and the rest is unaccounted for
                d_row, d_col, sigma, n_used = (
                    fine.d_row,
                    fine.d_col,
                    fine.sigma_px * max(1.0, 0.3 / max(fine.signal_share, 1e-3)),
                    fine.n_tiles,
                )
        if searched and trusted and key.overview is not None:
            # a fresh capture is checked against the rest of the overlap: few
            # regions (small overlap) or a repeated motif can agree on a wrong
            # shift, and then the overlap does not match
            factor = overview_factor(frame.shape)
            frame_small = overview(frame, factor)
            agreement = overlap_agreement(
                key.overview, frame_small, d_row, d_col, factor
            )
            if not agreement >= MIN_AGREEMENT:
                trusted = False
            elif (
                better_alternative(
                    key.overview,
                    frame_small,
                    d_row,
                    d_col,
                    factor,
                    self.max_shift_px + max(abs(key.offset_row), abs(key.offset_col)),
                    found_agreement=agreement,
                )
                is not None
            ):
                # a repeated motif: another period matches the overlap as well
                trusted = False
        if not sigma <= MAX_OK_SIGMA_PX:
            # found, but too faint to be within 0.5 px: record it, don't act on it
            trusted = False
        total_row = d_row + key.offset_row
        total_col = d_col + key.offset_col
        if max(abs(total_row), abs(total_col)) > self.max_shift_px:
            self._track = None
            return ShiftEstimate.failed(Status.OUT_OF_RANGE, confidence)
        if trusted:
            status = Status.OK
            self._track = (solution.d_row, solution.d_col, solution.median_ncc)
            self._prior = (solution.d_row, solution.d_col)
            if self._trial is not None and not searched:
                # not on a frame that needed the full search: the first frame
                # after a new reference, whose time budget the reference's
                # preparation has already used up in the live daemon
                self._run_trial(frame, key, solution)
        else:
            status = Status.LOW_CONFIDENCE
            self._track = None
        return ShiftEstimate(total_col, total_row, confidence, status, n_used, sigma)

    def _region_sigma(self, solution: _Solution, eta: float) -> float:
        """Per-axis uncertainty of the regions' fused shift, scaled to their scatter.

        The Gauss-Newton covariance counts only the frame's noise at the
        template's (noisy) gradients; the reference's own noise, which each
        region carries independently, makes the regions scatter 1.5-2x more
        than it predicts on noisy samples (measured over 12 reference draws of
        the bench's movies). So the covariance is scaled by the regions'
        reduced χ² about the fused shift (the Birge ratio), its median over the
        last 20 frames with three regions or more; never below 1. With a
        noisy template each step moves only the fraction ``eta`` of the way
        (:func:`.learn_step_efficiency`), so the fixed point moves ``1 / eta``
        times as far as the noise in a step: the uncertainty is divided by it.
        ``eta`` is the smaller of the learnt one (learnt only from steps well
        above the noise, so never on the fast path of a faint sample) and the
        templates' signal share of their gradient energy, from the reference's
        own noise (:attr:`RegionStack.signal_share`): a template that is mostly
        noise agrees with itself wherever the fit starts.

        References
        ----------
        .. [1] R. T. Birge, "The calculation of errors by the method of least
           squares", Phys. Rev. 40, 207-227 (1932),
           :doi:`10.1103/PhysRev.40.207`.
        """
        gn_var = 0.5 * float(np.trace(solution.cov))
        if (
            solution.n_inliers >= 3
            and math.isfinite(solution.reduced_chi2)
            and solution.spread_var > 1e-8  # not the reference against itself
        ):
            self._scatter_ratio.add(solution.reduced_chi2)
        scale = max(1.0, self._scatter_ratio.value)
        return math.sqrt(max(gn_var * scale, 0.0)) / min(max(eta, 0.05), 1.0)

    def _run_trial(
        self, frame: npt.NDArray[Any], key: _Key, solution: _Solution
    ) -> None:
        """Compare the unblurred fit with the σ = 1 px one on the first good frames.

        Both fits run on the same frames; the scatter of the regions' estimates
        around their fused value measures each one's real noise, template noise
        included. The unblurred fit wins only when its noise is clearly lower
        (by 30 % and by more than 1.5 mpx, above its small interpolation bias)
        and its gradients are mostly signal (step efficiency η >= 0.6): on
        sharp sparse samples (beads, stars) the blur discards signal; on faint
        smooth ones it removes the noise that swamps the gradients.
        """
        trial = self._trial
        assert trial is not None
        if solution.spread_var < 1e-8:
            # below 0.1 mpx: the reference measured against itself (or a copy),
            # which says nothing about the noise
            return
        # started half a pixel off so the fit must travel: a fit whose steps are
        # attenuated by noisy gradients would otherwise "converge" on the spot
        alt = self._refine(
            frame, trial.stack, solution.d_row + 0.5, solution.d_col - 0.5, max_iter=12
        )
        alt_var = alt.spread_var if alt is not None and alt.converged else math.inf
        trial.main_var.append(solution.spread_var)
        trial.alt_var.append(alt_var)
        if len(trial.main_var) < trial.n_frames:
            return
        self._trial = None
        self._trial_done = True
        main_rms = math.sqrt(float(np.mean(trial.main_var)))
        alt_rms = math.sqrt(float(np.mean(trial.alt_var)))
        # η: fraction of the unblurred template's gradient energy that is signal;
        # below ~0.6 its gradients are noise-dominated and its scatter flatters it
        # (errors in variables shared by the regions), whatever the numbers say
        if (
            trial.stack.eta >= 0.6
            and alt_rms < 0.7 * main_rms
            and main_rms - alt_rms > 0.0015
        ):
            self._sigma = 0.0
            smalls = tuple(self._reduce(p) for p in trial.stack.patches)
            self._key = _Key(
                trial.stack, smalls, key.offset_row, key.offset_col, key.frame_fit
            )
            self._track = None

    def _search(
        self, frame: npt.NDArray[Any], key: _Key
    ) -> tuple[float, float] | Status:
        """Integer displacement over the whole capture range (coarse, then fine)."""
        stack = key.stack
        radius = math.ceil(self.max_shift_px)
        found: list[IntegerMatch] = []
        for i in range(len(stack)):
            match = match_in_window(
                frame,
                stack.patches[i],
                int(stack.rows[i]),
                int(stack.cols[i]),
                centre_row=0,
                centre_col=0,
                radius_px=radius,
                scale=self._scale,
                template_small=key.smalls[i],
                prior=self._prior,
                tie_tolerance=0.05,
            )
            if match is not None:
                found.append(match)
        if not found or max(c.ncc for c in found) < 0.05:
            return Status.NO_PEAK
        if all(c.at_edge for c in found):
            return Status.OUT_OF_RANGE
        centre_row, centre_col = _vote(found, tol=self._scale + 1.0, prior=self._prior)
        if self._scale == 1:
            return centre_row, centre_col
        fine_rows, fine_cols = [], []
        for i in range(len(stack)):
            fine = match_in_window(
                frame,
                stack.patches[i],
                int(stack.rows[i]),
                int(stack.cols[i]),
                centre_row=round(centre_row),
                centre_col=round(centre_col),
                radius_px=self._scale + 1,
            )
            if fine is not None and not fine.at_edge:
                fine_rows.append(fine.d_row)
                fine_cols.append(fine.d_col)
        if not fine_rows:
            return Status.NO_PEAK
        return float(np.median(fine_rows)), float(np.median(fine_cols))

    def _refine(
        self,
        frame: npt.NDArray[Any],
        stack: RegionStack,
        d_row: float,
        d_col: float,
        *,
        max_iter: int = 8,
    ) -> _Solution | None:
        """Joint Gauss-Newton iterations of all regions from (d_row, d_col).

        With a noisy reference, the template's gradients carry noise energy, so
        each Gauss-Newton step undershoots by the signal fraction η of that
        energy (errors in variables: the fixed point is unbiased, only the
        convergence is slow, ~0.5 per step on faint, smooth samples). η is
        measured from the ratio of successive steps and each step is scaled by
        1/η, which restores fast convergence. Stops when the move is below the
        tolerance, half the statistical uncertainty or 1e-3 px, or when the
        error it leaves (the tail of the moves a linear convergence at the
        iteration's contraction predicts, :func:`.learn_contraction`) is below
        a fifth of it: that saves the confirming step of a frame that moved
        little.
        """
        solution: _Solution | None = None
        prev: tuple[float, float, float] | None = None  # plain step, its gain
        last_step = 0.0
        for _ in range(max_iter):
            fused = _fuse(stack.fit(frame, d_row, d_col))
            if fused is None:
                return None
            plain_r, plain_c = fused.d_row - d_row, fused.d_col - d_col
            sigma = math.sqrt(max(0.5 * float(fused.cov[0, 0] + fused.cov[1, 1]), 0.0))
            plain = (plain_r, plain_c)
            stack.eta = learn_step_efficiency(stack.eta, plain, prev, sigma)
            gain = min(1.0 / stack.eta, 3.0)
            move_r, move_c = gain * plain_r, gain * plain_c
            d_row += move_r
            d_col += move_c
            prev = (plain_r, plain_c, gain)
            step = max(abs(move_r), abs(move_c))
            tol = max(1e-3, 0.5 * sigma)
            if last_step > 0:
                stack.contraction = learn_contraction(
                    stack.contraction, step, last_step
                )
                left = error_left_px(step, step / last_step)
            else:
                left = error_left_px(step, stack.contraction)
            last_step = step
            solution = _Solution(
                d_row,
                d_col,
                fused.cov,
                fused.median_ncc,
                fused.n_inliers,
                fused.n_valid,
                converged=step < tol or left < LEFT_TOLERANCE * tol,
                spread_var=fused.spread_var,
                reduced_chi2=fused.reduced_chi2,
            )
            if solution.converged:
                return solution
            if step > 3.0:
                return None
        return solution


def _agrees(fine: FrameSolution, coarse: _Solution) -> bool:
    """Whether the frame fit confirms the regions' capture (within 0.5 px).

    The frame fit starts from the regions' shift and is far more precise, so
    only a gross disagreement (a wrong capture, most tiles rejected) counts.
    """
    dist = math.hypot(fine.d_row - coarse.d_row, fine.d_col - coarse.d_col)
    return dist <= 0.5 and 2 * fine.n_tiles >= fine.n_valid


def _median(values: npt.NDArray[np.float64]) -> float:
    """Median of a handful of values (np.median's overhead dominates at n ~ 9)."""
    ordered = np.sort(values)
    n = len(ordered)
    return float(
        ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    )


def _fuse(fit: RegionFit) -> _Solution | None:
    """Inverse-covariance mean of the regions that agree with the median."""
    ok = np.flatnonzero(fit.valid & (fit.ncc > 0) & np.isfinite(fit.d_row + fit.d_col))
    n_ok = len(ok)
    if n_ok == 0:
        return None
    rows, cols, cov = fit.d_row[ok], fit.d_col[ok], fit.cov[ok]
    # agree = within 0.3 px of the median, or within 4 sigma for noisy regions
    dist2 = (rows - _median(rows)) ** 2 + (cols - _median(cols)) ** 2
    spread2 = 16.0 * (cov[:, 0, 0] + cov[:, 1, 1])
    inliers = np.flatnonzero(dist2 <= np.maximum(0.09, spread2))
    n_in = len(inliers)
    if n_in == 0:
        return None
    # a handful of regions: the closed-form 2x2 algebra in plain floats
    rows_in, cols_in = rows[inliers].tolist(), cols[inliers].tolist()
    cov_in = cov[inliers].reshape(n_in, 4).tolist()
    info = []  # information matrices (rr, cc, rc) of the 2x2 covariances
    a = b = c = v_r = v_c = 0.0
    for (var_rr, var_rc, _, var_cc), row, col in zip(
        cov_in, rows_in, cols_in, strict=True
    ):
        det = var_rr * var_cc - var_rc * var_rc + 1e-24
        i_rr, i_cc, i_rc = var_cc / det, var_rr / det, -var_rc / det
        info.append((i_rr, i_cc, i_rc))
        a, b, c = a + i_rr, b + i_cc, c + i_rc
        v_r += i_rr * row + i_rc * col
        v_c += i_rc * row + i_cc * col
    det_sum = a * b - c * c
    fused_cov = np.array([[b, -c], [-c, a]]) / det_sum
    d_row = (b * v_r - c * v_c) / det_sum
    d_col = (a * v_c - c * v_r) / det_sum
    sq = chi2 = 0.0
    for (i_rr, i_cc, i_rc), row, col in zip(info, rows_in, cols_in, strict=True):
        res_r, res_c = row - d_row, col - d_col
        sq += res_r * res_r + res_c * res_c
        chi2 += i_rr * res_r * res_r + 2.0 * i_rc * res_r * res_c + i_cc * res_c * res_c
    spread = sq / (n_in - 1) / n_in if n_in > 1 else math.inf
    reduced_chi2 = chi2 / (2 * (n_in - 1)) if n_in > 1 else math.nan
    return _Solution(
        d_row,
        d_col,
        fused_cov,
        _median(fit.ncc[ok[inliers]]),
        n_in,
        n_ok,
        spread_var=spread,
        reduced_chi2=reduced_chi2,
    )


def _vote(
    matches: list[IntegerMatch], tol: float, prior: tuple[float, float]
) -> tuple[float, float]:
    """Displacement most regions agree on.

    Ties in support go to the highest summed correlation, unless it is within 5 %
    of another cluster's, in which case the cluster nearest ``prior`` wins (a
    periodic sample).
    """
    best_key: tuple[int, float] = (-1, -math.inf)
    best = (matches[0].d_row, matches[0].d_col)
    for m in matches:
        support = [
            o
            for o in matches
            if abs(o.d_row - m.d_row) <= tol and abs(o.d_col - m.d_col) <= tol
        ]
        score = (len(support), sum(o.ncc for o in support))
        if score[0] == best_key[0] and score[1] >= 0.95 * best_key[1]:
            # a near tie: prefer the cluster closer to the prior
            here = (m.d_row - prior[0]) ** 2 + (m.d_col - prior[1]) ** 2
            there = (best[0] - prior[0]) ** 2 + (best[1] - prior[1]) ** 2
            better = here < there
        else:
            better = score > best_key
        if better:
            best_key = score
            best = (
                _median(np.array([o.d_row for o in support])),
                _median(np.array([o.d_col for o in support])),
            )
    return best
