"""Camera-to-stage calibration: which stage move shifts the image by how much.

Conventions
-----------
A stage move ``s`` (µm, stage axes) shifts the image content by ``d = A @ s``
pixels (``dx_px`` along columns, ``dy_px`` along rows, the registration's
convention). The calibration stores ``px_to_um = inv(A)``: the stage move that
*produces* an image shift. To cancel a measured displacement ``d`` the stage must
move by ``-px_to_um @ d``.

The geometry is reported against the usual microscope convention, where a stage
move of +X µm moves the image by -X / pixel size px (as on the Micro-Manager demo
and :mod:`stagelock.sources._simulated`): ``-A = R(rotation_deg) @ F / pixel_size_um``
with ``F = diag(1, -1)`` when ``flipped`` (a mirrored y axis; a mirrored x axis is
the same as a y flip plus 180°).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from stagelock.registration import Registrar, Status

from ._mmstage import MMStageDriver
from ._protocol import StageDriver

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from collections.abc import Callable

    from pymmcore_plus import CMMCorePlus

__all__ = ["Calibration", "CalibrationError", "calibrate"]

logger = logging.getLogger(__name__)

Matrix2 = tuple[tuple[float, float], tuple[float, float]]


class CalibrationError(RuntimeError):
    """The calibration could not produce a trustworthy camera↔stage transform."""


@dataclass(frozen=True, slots=True)
class Calibration:
    """The camera→stage transform: image displacement (px) → stage move (µm).

    Attributes
    ----------
    matrix : ((a, b), (c, d))
        ``px_to_um``: the stage move ``(dx_um, dy_um) = matrix @ (dx_px, dy_px)``
        that shifts the image content by ``(dx_px, dy_px)``.
    residual_px : float
        RMS residual of the fit that produced it (NaN if built by hand).
    date : str
        ISO-8601 time of the calibration.
    n_points : int
        Number of images in the fit.
    step_um : float
        Step of the calibration pattern (NaN if built by hand).
    """

    matrix: Matrix2
    residual_px: float = math.nan
    date: str = ""
    n_points: int = 0
    step_um: float = math.nan

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape != (2, 2) or not np.isfinite(m).all():
            raise ValueError(
                f"px_to_um must be a finite 2×2 matrix; got {self.matrix!r}"
            )
        if abs(np.linalg.det(m)) < 1e-12:
            raise ValueError(f"px_to_um is singular: {self.matrix!r}")

    # -- construction -------------------------------------------------------

    @classmethod
    def from_matrix(cls, px_to_um: npt.ArrayLike, **kwargs: Any) -> Calibration:
        """Build from any 2×2 array-like ``px_to_um``."""
        m = np.asarray(px_to_um, dtype=np.float64).reshape(2, 2)
        matrix: Matrix2 = (
            (float(m[0, 0]), float(m[0, 1])),
            (float(m[1, 0]), float(m[1, 1])),
        )
        return cls(matrix, **kwargs)

    @classmethod
    def from_geometry(
        cls, pixel_size_um: float, rotation_deg: float = 0.0, flipped: bool = False
    ) -> Calibration:
        """Build from a pixel size, rotation and flip (see the module conventions).

        Parameters
        ----------
        pixel_size_um : float
            Sample-plane size of one pixel (> 0).
        rotation_deg : float
            Camera rotation relative to the stage axes.
        flipped : bool
            Mirrored y axis.
        """
        if not pixel_size_um > 0:
            raise ValueError(f"pixel_size_um must be > 0; got {pixel_size_um}")
        t = math.radians(rotation_deg)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        flip = np.diag([1.0, -1.0 if flipped else 1.0])
        camera = rot @ flip / pixel_size_um  # image px per µm of sample motion
        return cls.from_matrix(np.linalg.inv(-camera))

    # -- use ----------------------------------------------------------------

    @property
    def px_to_um_matrix(self) -> npt.NDArray[np.float64]:
        """``matrix`` as a numpy array."""
        return np.asarray(self.matrix, dtype=np.float64)

    @property
    def um_to_px_matrix(self) -> npt.NDArray[np.float64]:
        """Inverse: image shift (px) caused by a stage move (µm)."""
        return np.asarray(np.linalg.inv(self.px_to_um_matrix), dtype=np.float64)

    def px_to_um(self, dx_px: float, dy_px: float) -> tuple[float, float]:
        """Return the stage move (µm) that shifts the image by (dx_px, dy_px)."""
        v = self.px_to_um_matrix @ np.array([dx_px, dy_px], dtype=np.float64)
        return float(v[0]), float(v[1])

    def um_to_px(self, dx_um: float, dy_um: float) -> tuple[float, float]:
        """Return the image shift (px) that a stage move of (dx_um, dy_um) causes."""
        v = self.um_to_px_matrix @ np.array([dx_um, dy_um], dtype=np.float64)
        return float(v[0]), float(v[1])

    def _camera(self) -> npt.NDArray[np.float64]:
        return np.asarray(-self.um_to_px_matrix, dtype=np.float64)

    @property
    def pixel_size_um(self) -> float:
        """Geometric-mean pixel size, √|det px_to_um|."""
        return float(math.sqrt(abs(np.linalg.det(self.px_to_um_matrix))))

    @property
    def flipped(self) -> bool:
        """True when the camera sees the stage axes mirrored (det < 0)."""
        return bool(np.linalg.det(self.px_to_um_matrix) < 0)

    @property
    def rotation_deg(self) -> float:
        """Camera rotation (degrees, -180..180), from the polar decomposition."""
        u, _, vt = np.linalg.svd(self._camera())
        rot = u @ vt  # closest orthogonal matrix
        if self.flipped:
            rot = rot @ np.diag([1.0, -1.0])
        return float(math.degrees(math.atan2(rot[1, 0], rot[0, 0])))

    @property
    def anisotropy(self) -> float:
        """Ratio of the singular values minus 1 (0 for square pixels, no skew)."""
        s = np.linalg.svd(self.px_to_um_matrix, compute_uv=False)
        return float(s[0] / s[1] - 1.0)

    # -- files ----------------------------------------------------------------

    def to_file(self, path: str | Path) -> Path:
        """Write the calibration as a small TOML file; returns the path."""
        (a, b), (c, d) = self.matrix
        lines = [
            "# stagelock camera-to-stage calibration (stagelock calibrate)",
            "# px_to_um: stage move (x, y) µm = px_to_um @ image shift (dx, dy) px",
            "[calibration]",
            f"px_to_um = [[{a!r}, {b!r}], [{c!r}, {d!r}]]",
            f"pixel_size_um = {self.pixel_size_um!r}",
            f"rotation_deg = {self.rotation_deg!r}",
            f"flip = {'true' if self.flipped else 'false'}",
            f"anisotropy = {self.anisotropy!r}",
            f"residual_px = {_toml_float(self.residual_px)}",
            f"n_points = {int(self.n_points)}",
            f"step_um = {_toml_float(self.step_um)}",
            f'date = "{self.date}"',
            "",
        ]
        out = Path(path)
        out.write_text("\n".join(lines), encoding="utf-8")
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> Calibration:
        """Read a calibration TOML file written by :meth:`to_file`.

        Raises
        ------
        ValueError
            If the file is not valid TOML or lacks a valid ``[calibration]``
            ``px_to_um`` 2×2 matrix (the message names the file and the problem).
        FileNotFoundError
            If the file does not exist.
        """
        p = Path(path)
        try:
            doc = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{p}: not valid TOML ({exc})") from None
        table = doc.get("calibration")
        if not isinstance(table, dict) or "px_to_um" not in table:
            raise ValueError(f"{p}: missing [calibration] px_to_um = [[a, b], [c, d]]")
        try:
            m = np.asarray(table["px_to_um"], dtype=np.float64)
        except (TypeError, ValueError):
            m = np.zeros(0)
        if m.shape != (2, 2):
            raise ValueError(
                f"{p}: calibration.px_to_um must be [[a, b], [c, d]]; "
                f"got {table['px_to_um']!r}"
            )
        try:
            return cls.from_matrix(
                m,
                residual_px=float(table.get("residual_px", math.nan)),
                date=str(table.get("date", "")),
                n_points=int(table.get("n_points", 0)),
                step_um=float(table.get("step_um", math.nan)),
            )
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None


def _toml_float(value: float) -> str:
    return "nan" if math.isnan(value) else repr(float(value))


# -- the procedure ---------------------------------------------------------------

Pattern = Literal["cross", "grid"]
_PATTERNS: dict[str, list[tuple[int, int]]] = {
    "cross": [(1, 0), (-1, 0), (0, 1), (0, -1)],
    "grid": [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)],
}


@dataclass(frozen=True, slots=True)
class _Sample:
    stage_um: tuple[float, float]  # read back, relative to the start
    shift_px: tuple[float, float]
    time_s: float


class _Mover:
    """Moves to offsets from the start, always approaching from the same side."""

    def __init__(
        self,
        driver: StageDriver,
        *,
        settle_s: float,
        timeout_s: float,
        sleep: Callable[[float], None],
    ) -> None:
        self.driver = driver
        self.settle_s = settle_s
        self.timeout_s = timeout_s
        self.sleep = sleep
        self.start = driver.get_position_um()
        self.offset = (0.0, 0.0)  # commanded offset from the start

    def go(self, x_um: float, y_um: float, approach_um: float) -> tuple[float, float]:
        """Move to start + (x, y); returns the read-back offset from the start."""
        for tx, ty in ((x_um - approach_um, y_um - approach_um), (x_um, y_um)):
            if approach_um == 0 and (tx, ty) != (x_um, y_um):
                continue
            dx, dy = tx - self.offset[0], ty - self.offset[1]
            if dx or dy:
                self.driver.move_relative_um(dx, dy)
                self.offset = (tx, ty)
                self.driver.wait(self.timeout_s)
        if self.settle_s > 0:
            self.sleep(self.settle_s)
        x, y = self.driver.get_position_um()
        return x - self.start[0], y - self.start[1]


def _as_driver(target: StageDriver | CMMCorePlus, device: str | None) -> StageDriver:
    if isinstance(target, StageDriver):
        return target
    return MMStageDriver(target, device)


def calibrate(
    stage: StageDriver | CMMCorePlus,
    snap: Callable[[], npt.ArrayLike] | None = None,
    *,
    step_um: float | None = None,
    target_shift_px: float = 15.0,
    pattern: Pattern = "cross",
    approach_um: float | None = None,
    settle_s: float = 0.05,
    max_residual_px: float = 0.5,
    max_anisotropy: float = 0.1,
    move_timeout_s: float = 10.0,
    device: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Calibration:
    """Measure the camera→stage transform by moving the stage in a known pattern.

    The stage visits ``start + step·(i, j)`` for the pattern's offsets, returning
    to the start between them; at each position it waits for the stage to settle,
    snaps, and measures the image shift against the image at the start with
    :class:`~stagelock.Registrar`. The model ``shift = A @ stage + b + v·t`` is fitted
    by least squares (``v`` absorbs linear drift during the calibration) and
    ``px_to_um = inv(A)``. The stage ends where it started.

    Parameters
    ----------
    stage : StageDriver or CMMCorePlus
        The stage (a core is wrapped in :class:`MMStageDriver`).
    snap : callable, optional
        Returns one camera image; default ``core.snap`` when ``stage`` is a core.
    step_um : float, optional
        Pattern step; default: probed (growing steps from 2 µm) so that a step
        shifts the image by about ``target_shift_px``.
    target_shift_px : float
        Image shift per step aimed at by the automatic step.
    pattern : {"cross", "grid"}
        ±x/±y (5 positions) or the full 3×3 grid.
    approach_um : float, optional
        Anti-backlash pre-move (default 20 % of the step).
    settle_s : float
        Extra wait after the stage reports idle.
    max_residual_px : float
        Largest accepted RMS fit residual.
    max_anisotropy : float
        Largest accepted singular-value ratio minus 1.
    move_timeout_s : float
        Maximum wait per move.
    device : str, optional
        XY stage label when ``stage`` is a core.
    sleep, clock : callable
        Time functions (replace both to run on a simulated clock).

    Returns
    -------
    Calibration

    Raises
    ------
    CalibrationError
        If an image cannot be registered, the response is too small, the fit is
        degenerate (anisotropy) or its residual is too large.
    """
    driver = _as_driver(stage, device)
    if snap is None:
        if isinstance(stage, StageDriver):
            raise TypeError("calibrate() needs snap=... when given a StageDriver")
        snap = stage.snap
    if pattern not in _PATTERNS:
        raise ValueError(f"pattern must be 'cross' or 'grid'; got {pattern!r}")
    mover = _Mover(driver, settle_s=settle_s, timeout_s=move_timeout_s, sleep=sleep)
    try:
        return _run(
            mover,
            snap,
            step_um=step_um,
            target_shift_px=target_shift_px,
            pattern=pattern,
            approach_um=approach_um,
            max_residual_px=max_residual_px,
            max_anisotropy=max_anisotropy,
            clock=clock,
        )
    finally:
        # leave the stage where it was, whatever happened
        try:
            mover.go(0.0, 0.0, 0.0)
            # relative moves round to the stage's resolution one by one: remove
            # the accumulated rounding with one absolute correction
            x, y = driver.get_position_um()
            dx, dy = mover.start[0] - x, mover.start[1] - y
            if dx or dy:
                driver.move_relative_um(dx, dy)
                driver.wait(move_timeout_s)
        except Exception:
            logger.exception("could not return the stage to its start position")


def _run(
    mover: _Mover,
    snap: Callable[[], npt.ArrayLike],
    *,
    step_um: float | None,
    target_shift_px: float,
    pattern: Pattern,
    approach_um: float | None,
    max_residual_px: float,
    max_anisotropy: float,
    clock: Callable[[], float],
) -> Calibration:
    first = np.asarray(snap())
    shape = first.shape
    capture_px = float(max(8.0, min(50.0, 0.25 * min(shape))))
    if step_um is None:
        step_um = _probe_step(mover, snap, first, target_shift_px, capture_px)
    step = float(step_um)
    approach = 0.2 * step if approach_um is None else float(approach_um)

    def measure(registrar: Registrar, where: str) -> tuple[float, float]:
        est = registrar.measure(snap())
        if est.status is not Status.OK:
            raise CalibrationError(
                f"could not register the image at {where} "
                f"(status {est.status.value}, confidence {est.confidence:.2f}); "
                "use a smaller step_um or a sample with more texture"
            )
        return est.dx_px, est.dy_px

    t0 = clock()
    pos0 = mover.go(0.0, 0.0, approach)
    registrar = Registrar(np.asarray(snap()), max_shift_px=capture_px)
    samples = [_Sample(pos0, (0.0, 0.0), 0.0)]
    for i, j in _PATTERNS[pattern]:
        pos = mover.go(i * step, j * step, approach)
        samples.append(
            _Sample(
                pos,
                measure(registrar, f"offset ({i * step:g}, {j * step:g}) µm"),
                clock() - t0,
            )
        )
        pos = mover.go(0.0, 0.0, approach)
        samples.append(
            _Sample(pos, measure(registrar, "the start position"), clock() - t0)
        )
    return _fit(samples, step, max_residual_px, max_anisotropy)


def _probe_step(
    mover: _Mover,
    snap: Callable[[], npt.ArrayLike],
    first: npt.NDArray[Any],
    target_shift_px: float,
    capture_px: float,
) -> float:
    """Find a step that shifts the image by ~target_shift_px (along stage x)."""
    registrar = Registrar(first, max_shift_px=capture_px)
    probe = 2.0
    # 2, 8, 32, 128 µm: beyond that a stage that moves the sample would have
    # shifted any microscope image by many pixels
    for _ in range(4):
        mover.go(probe, 0.0, 0.0)
        est = registrar.measure(snap())
        mover.go(0.0, 0.0, 0.0)
        if est.status is Status.OK:
            moved = math.hypot(est.dx_px, est.dy_px)
            if moved >= 3.0:
                return probe * min(target_shift_px, 0.4 * capture_px) / moved
            probe *= 4.0
        elif est.status is Status.OUT_OF_RANGE:
            probe /= 4.0
        else:
            break
    raise CalibrationError(
        "could not find a stage step that moves the image measurably "
        f"(last probe {probe:g} µm); is the stage moving the sample under the "
        "camera? pass step_um explicitly"
    )


def _fit(
    samples: list[_Sample],
    step_um: float,
    max_residual_px: float,
    max_anisotropy: float,
) -> Calibration:
    stage = np.array([s.stage_um for s in samples])
    shift = np.array([s.shift_px for s in samples])
    times = np.array([s.time_s for s in samples])
    # shift = A @ stage + b + v * t: the start is revisited, so v (linear drift
    # during the calibration) is separable from A
    design = np.column_stack([stage, np.ones(len(samples)), times])
    coef, *_ = np.linalg.lstsq(design, shift, rcond=None)
    um_to_px = coef[:2].T  # rows: dx, dy; columns: stage x, stage y
    residual = shift - design @ coef
    residual_px = float(math.sqrt(np.mean(np.sum(residual**2, axis=1))))
    sv = np.linalg.svd(um_to_px, compute_uv=False)
    if sv[1] * step_um < 0.5:
        raise CalibrationError(
            f"a {step_um:g} µm step moved the image by less than 0.5 px along one "
            "direction: the stage does not move the sample (or step_um is far too "
            "small)"
        )
    if sv[0] / sv[1] - 1.0 > max_anisotropy:
        raise CalibrationError(
            f"degenerate fit: the image responds {sv[0] / sv[1]:.2f}× more to one "
            f"stage direction than the other (limit {1 + max_anisotropy:.2f}); "
            f"matrix um_to_px={um_to_px.round(4).tolist()}"
        )
    if residual_px > max_residual_px:
        raise CalibrationError(
            f"fit residual {residual_px:.3f} px RMS exceeds {max_residual_px:g} px: "
            "the stage did not go where asked (backlash, slipping, drift); "
            "check the stage or raise max_residual_px"
        )
    date = _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")
    cal = Calibration.from_matrix(
        np.linalg.inv(um_to_px),
        residual_px=residual_px,
        date=date,
        n_points=len(samples),
        step_um=step_um,
    )
    logger.info(
        "calibration: pixel size %.4f µm, rotation %.2f°, flip %s, residual %.3f px",
        cal.pixel_size_um,
        cal.rotation_deg,
        cal.flipped,
        residual_px,
    )
    return cal
