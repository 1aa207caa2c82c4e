"""Whole-stack registration: shifts of every frame, and applying them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
import numpy.typing as npt

from ._registrar import Registrar, as_image
from ._types import ShiftEstimate

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = ["estimate_shifts", "iter_estimates", "shift_image"]

ReferenceChoice = Literal["first", "mean", "keyframe", "previous"]


def iter_estimates(
    frames: Iterable[npt.ArrayLike],
    *,
    reference: ReferenceChoice | npt.ArrayLike = "first",
    n_mean: int = 10,
    coverage: float | None = None,
    **options: object,
) -> Iterator[ShiftEstimate]:
    """Yield a :class:`ShiftEstimate` per frame, streaming.

    Only the reference and one frame are held at a time (``reference="mean"``
    reads the first ``n_mean`` frames twice, so ``frames`` must then be
    re-iterable, e.g. a sequence or a memory-mapped stack).

    Parameters
    ----------
    frames : iterable of 2-D arrays
        The frames, in order.
    reference : {"first", "mean", "keyframe", "previous"} or ndarray
        ``"first"``: frame 0. ``"mean"``: the mean of the first ``n_mean`` frames.
        ``"keyframe"``: frame 0, re-anchored on later frames when the sample
        changes (see :class:`Registrar`). ``"previous"``: every frame measured
        against the one before (StackReg-style chaining), shifts still relative
        to frame 0. An array: that image.
    n_mean : int
        Frames averaged by ``reference="mean"``.
    coverage : float, optional
        Fraction of the frame used by the sub-pixel fit, 0 < coverage <= 1
        (see :class:`Registrar`); default None: the template regions alone.
    **options
        Passed to :class:`Registrar` (``roi``, ``max_shift_px``, ...).

    Yields
    ------
    ShiftEstimate
        Relative to the reference; the estimate of frame 0 with
        ``reference="first"``/``"keyframe"`` is exactly zero.
    """
    registrar: Registrar | None = None
    if coverage is not None:
        options = {**options, "coverage": coverage}
    if isinstance(reference, str):
        if reference not in ("first", "mean", "keyframe", "previous"):
            raise ValueError(
                "reference must be 'first', 'mean', 'keyframe', 'previous' or an "
                "image; "
                f"got {reference!r}"
            )
        if reference == "mean":
            if n_mean < 1:
                raise ValueError(f"n_mean must be >= 1; got {n_mean}")
            head = []
            for i, frame in enumerate(frames):
                if i >= n_mean:
                    break
                head.append(as_image(frame))
            if not head:
                return
            registrar = Registrar.from_frames(head, **options)
        elif reference in ("keyframe", "previous"):
            options = {**options, "reference_strategy": reference}
    else:
        registrar = Registrar(reference, **options)  # type: ignore[arg-type]
    for i, frame in enumerate(frames):
        if registrar is None:
            registrar = Registrar(frame, **options)  # type: ignore[arg-type]
        if i == 0 and isinstance(reference, str) and reference != "mean":
            # the reference measured against itself is zero by definition: no
            # first-frame jump from interpolation or noise
            yield ShiftEstimate.at_reference(len(registrar.regions))
            continue
        yield registrar.measure(frame)


def estimate_shifts(
    stack: npt.ArrayLike | Iterable[npt.ArrayLike],
    **options: object,
) -> npt.NDArray[np.float64]:
    """Estimate the sub-pixel translation of every frame of a stack.

    Parameters
    ----------
    stack : ndarray, shape (T, H, W), or iterable of 2-D frames
        The movie; not modified.
    **options
        ``reference``, ``n_mean``, ``coverage`` (see :func:`iter_estimates`) and
        the :class:`Registrar` options (``roi``, ``max_shift_px``, ``n_regions``,
        ...). ``coverage=1.0`` fits every pixel of the overlap: the most precise
        and the slowest setting.

    Returns
    -------
    ndarray of float64, shape (T, 2)
        ``(dx, dy)`` per frame: displacement of the frame's content relative to
        the reference along columns and rows, in pixels. NaN for frames that
        could not be measured (see :func:`iter_estimates` for the statuses).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> base = rng.random((96, 96)).astype(np.float32)
    >>> movie = np.stack([np.roll(base, (0, k), axis=(0, 1)) for k in range(3)])
    >>> estimate_shifts(movie, max_shift_px=8).round(3).tolist()
    [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
    """
    if isinstance(stack, np.ndarray) and stack.ndim != 3:
        raise ValueError(f"stack must have shape (T, H, W); got shape {stack.shape}")
    frames = stack if isinstance(stack, np.ndarray) else list(stack)  # type: ignore[arg-type]
    rows = [(e.dx_px, e.dy_px) for e in iter_estimates(frames, **options)]  # type: ignore[arg-type]
    return np.array(rows, dtype=np.float64).reshape(len(rows), 2)


def shift_image(
    image: npt.ArrayLike, dx_px: float, dy_px: float, *, fill: float = 0.0
) -> npt.NDArray[np.generic]:
    """Translate an image by (dx_px, dy_px), sub-pixel, keeping its dtype.

    To align a frame whose measured shift is (dx, dy), call
    ``shift_image(frame, -dx, -dy)``. Uses Lanczos-4 interpolation; integer
    outputs are rounded and clipped to the dtype's range; pixels that come from
    outside the image are set to ``fill``.
    """
    src = as_image(image, "image")
    if not (np.isfinite(dx_px) and np.isfinite(dy_px)):
        return src.copy()
    matrix = np.array([[1.0, 0.0, dx_px], [0.0, 1.0, dy_px]], dtype=np.float64)
    work = src.astype(np.float32, copy=False) if src.dtype != np.float64 else src
    out = cv2.warpAffine(
        work,
        matrix,
        (src.shape[1], src.shape[0]),
        flags=cv2.INTER_LANCZOS4,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=fill,
    )
    if src.dtype.kind in "ui":
        info = np.iinfo(src.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(src.dtype)
    return out.astype(src.dtype, copy=False)
