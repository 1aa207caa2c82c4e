"""The tools compared, behind one contract.

A tool is a :class:`Tool` holding either a stack function ``stack(movie) -> (T, 2)``
or a streaming ``prepare(reference) -> step`` with ``step(frame) -> (dx, dy)``.
Every adapter returns ``(dx, dy)`` = displacement of the sample in frame ``t``
relative to frame 0, px, ``+x`` = columns, ``+y`` = rows (stagelock's convention);
each docstring states the tool's raw output and the conversion, and
``registration.py`` re-checks every sign on a noiseless movie before the run.
"""

from __future__ import annotations

import importlib.metadata as md
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Movie = npt.NDArray[np.generic]
Step = Callable[[npt.NDArray[np.generic]], tuple[float, float]]


@dataclass(frozen=True)
class Tool:
    """One registration tool as the bench runs it."""

    name: str
    call: str  # how it is called, for the README
    dist: str  # distribution whose version is reported
    stack: Callable[[Movie], npt.NDArray[np.float64]] | None = None
    prepare: Callable[[npt.NDArray[np.generic]], Step] | None = None
    threaded: bool = (
        False  # speed depends on OpenCV's pool: also timed with default threads
    )

    def version(self) -> str:
        try:
            return md.version(self.dist)
        except md.PackageNotFoundError:
            return "not installed"


def _central_box(h: int, w: int) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the central half-size template."""
    return w // 4, h // 4, w // 2, h // 2


def _parabola(m: npt.NDArray[np.generic], x: int, y: int) -> tuple[float, float]:
    """3-point parabolic vertex around an integer peak of ``m`` at (x, y)."""

    def vertex(a: float, b: float, c: float) -> float:
        den = a - 2.0 * b + c
        return 0.0 if den >= 0 else 0.5 * (a - c) / den

    v = np.asarray(m, dtype=np.float64)
    h, w = v.shape
    ox = vertex(v[y, x - 1], v[y, x], v[y, x + 1]) if 0 < x < w - 1 else 0.0
    oy = vertex(v[y - 1, x], v[y, x], v[y + 1, x]) if 0 < y < h - 1 else 0.0
    return x + ox, y + oy


# --------------------------------------------------------------------------- stagelock


MAX_SHIFT_PX = 50.0


def stagelock_stack(movie: Movie) -> npt.NDArray[np.float64]:
    """``stagelock.estimate_shifts(movie, max_shift_px=50)``: already our convention."""
    import stagelock

    return np.asarray(stagelock.estimate_shifts(movie, max_shift_px=MAX_SHIFT_PX))


def stagelock_live(reference: npt.NDArray[np.generic]) -> Step:
    """``Registrar(reference, max_shift_px=50).measure(frame)``: the live path."""
    import stagelock

    reg = stagelock.Registrar(reference, max_shift_px=MAX_SHIFT_PX)

    def step(frame: npt.NDArray[np.generic]) -> tuple[float, float]:
        est = reg.measure(frame)
        return est.dx_px, est.dy_px

    return step


COVERAGES = (0.01, 0.05, 0.25, 0.5, 1.0)
"""The coverage curve drawn per movie (stagelock at each, one tool each)."""


def stagelock_at(coverage: float) -> Callable[[Movie], npt.NDArray[np.float64]]:
    """``estimate_shifts(movie, max_shift_px=50, coverage=c)``."""

    def stack(movie: Movie) -> npt.NDArray[np.float64]:
        import stagelock

        return np.asarray(
            stagelock.estimate_shifts(
                movie, max_shift_px=MAX_SHIFT_PX, coverage=coverage
            )
        )

    return stack


def coverage_of(tool: str) -> float | None:
    """The coverage of a ``stagelock_c<coverage>`` tool name, else None."""
    if not tool.startswith("stagelock_c"):
        return None
    return float(tool.removeprefix("stagelock_c"))


# ----------------------------------------------------------------------------- peers


def pystackreg_stack(movie: Movie) -> npt.NDArray[np.float64]:
    """pyStackReg translation, stack API.

    Raw: ``tmats[t]`` maps reference coordinates into frame ``t``, so
    ``tmats[:, 0, 2], tmats[:, 1, 2]`` is already (dx, dy); no conversion.
    """
    from pystackreg import StackReg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its time-axis guess warns on short stacks
        tm = StackReg(StackReg.TRANSLATION).register_stack(movie, reference="first")
    return np.column_stack([tm[:, 0, 2], tm[:, 1, 2]]).astype(np.float64)


def tmpy_stack(movie: Movie) -> npt.NDArray[np.float64]:
    """TemplateMatchingPy 1.0.3 ``StackAligner``, central half-size template.

    Raw: ``displacements[t]`` is the correction that aligns frame ``t`` (minus the
    sample displacement): negated.  Run with its default ``search_area=0``
    (full-image search): with ``search_area > 0`` 1.0.3 returns shifts offset by
    the search window's origin.  Its time includes its own per-frame warpAffine.
    """
    from templatematchingpy import AlignmentConfig, StackAligner

    t, h, w = movie.shape
    aligner = StackAligner(AlignmentConfig(method=5, search_area=0, subpixel=True))
    aligner.register_stack(movie, _central_box(h, w), reference_slice=0)
    return -np.asarray(aligner.displacements, dtype=np.float64).reshape(t, 2)


def skimage_pcc(reference: npt.NDArray[np.generic]) -> Step:
    """scikit-image ``phase_cross_correlation(ref, frame, upsample_factor=100)``.

    Raw: ``shift = (row, col)`` that registers the frame onto the reference
    (minus the displacement): ``(dx, dy) = (-shift[1], -shift[0])``.
    """
    from skimage.registration import phase_cross_correlation

    ref = np.asarray(reference)

    def step(frame: npt.NDArray[np.generic]) -> tuple[float, float]:
        shift, _err, _phase = phase_cross_correlation(  # type: ignore[no-untyped-call]
            ref, frame, upsample_factor=100
        )
        return -float(shift[1]), -float(shift[0])

    return step


def cv2_phasecorr(reference: npt.NDArray[np.generic]) -> Step:
    """OpenCV ``phaseCorrelate(ref, frame)``, float32, no window.

    Raw: ``(sx, sy)`` = displacement of the second image's content: no conversion.
    """
    import cv2

    ref32 = np.asarray(reference, dtype=np.float32)

    def step(frame: npt.NDArray[np.generic]) -> tuple[float, float]:
        (sx, sy), _response = cv2.phaseCorrelate(ref32, np.asarray(frame, np.float32))
        return float(sx), float(sy)

    return step


def cv2_match(reference: npt.NDArray[np.generic]) -> Step:
    """``cv2.matchTemplate`` TM_CCOEFF_NORMED + 3-point parabola, central template.

    The template is the central half of the reference, searched over the whole
    frame.  Raw: peak = template's top-left corner in the frame; minus its origin
    in the reference = (dx, dy).
    """
    import cv2

    h, w = reference.shape
    x0, y0, tw, th = _central_box(h, w)
    templ = np.ascontiguousarray(
        reference[y0 : y0 + th, x0 : x0 + tw], dtype=np.float32
    )

    def step(frame: npt.NDArray[np.generic]) -> tuple[float, float]:
        res = cv2.matchTemplate(
            np.asarray(frame, np.float32), templ, cv2.TM_CCOEFF_NORMED
        )
        _, _, _, (px, py) = cv2.minMaxLoc(res)
        sx, sy = _parabola(res, px, py)
        return sx - x0, sy - y0

    return step


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool(
            "stagelock",
            "`stagelock.estimate_shifts(movie, max_shift_px=50)`",
            "stagelock",
            stack=stagelock_stack,
            threaded=True,
        ),
        Tool(
            "stagelock_live",
            "`Registrar(movie[0], max_shift_px=50).measure(frame)` per frame",
            "stagelock",
            prepare=stagelock_live,
            threaded=True,
        ),
        Tool(
            "pystackreg",
            "`StackReg(StackReg.TRANSLATION).register_stack(movie, reference='first')`",
            "pystackreg",
            stack=pystackreg_stack,
        ),
        Tool(
            "tmpy",
            "`StackAligner(AlignmentConfig(method=5, search_area=0, subpixel=True))`"
            "`.register_stack(movie, central half bbox)`",
            "templatematchingpy",
            stack=tmpy_stack,
            threaded=True,
        ),
        Tool(
            "skimage_pcc",
            "`phase_cross_correlation(ref, frame, upsample_factor=100)`",
            "scikit-image",
            prepare=skimage_pcc,
        ),
        Tool(
            "cv2_phasecorr",
            "`cv2.phaseCorrelate(ref32, frame32)`",
            "opencv-python-headless",
            prepare=cv2_phasecorr,
            threaded=True,
        ),
        Tool(
            "cv2_match",
            "`cv2.matchTemplate(frame, central half of ref, TM_CCOEFF_NORMED)`"
            " + parabola",
            "opencv-python-headless",
            prepare=cv2_match,
            threaded=True,
        ),
    )
}
for _c in COVERAGES:
    TOOLS[f"stagelock_c{_c:g}"] = Tool(
        f"stagelock_c{_c:g}",
        f"`stagelock.estimate_shifts(movie, max_shift_px=50, coverage={_c:g})`",
        "stagelock",
        stack=stagelock_at(_c),
    )
STAGELOCK_TOOLS = (
    "stagelock",
    "stagelock_live",
    *(f"stagelock_c{c:g}" for c in COVERAGES),
)
