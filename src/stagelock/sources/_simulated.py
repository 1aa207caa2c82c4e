"""A realistic simulated microscope on pymmcore-plus's ``UniMMCore``.

A Python camera images the bundled real sample through a camera↔stage geometry
(pixel size, rotation, axis flips) while the sample drifts (thermal creep, random
walk, occasional bumps) and a Python XY stage moves with finite speed, settle time,
step quantisation and backlash. Everything is driven through the ordinary
pymmcore-plus calls (``snapImage``, ``setXYPosition``, sequences, MDAs), so the
code under test cannot tell it from a microscope — except that the truth is known.

Geometry
--------
The drift ``d`` (µm) is the sample's displacement in stage coordinates; the stage
position ``s`` (µm, motor frame, origin-independent) moves the sample the other
way. The content of the camera image is displaced from where it was at ``d = s = 0``
by::

    shift_px = R(rotation_deg) @ diag(±1, ±1) @ (d - s) / pixel_size_um

with ``-1`` on an axis when ``flip_x``/``flip_y`` is set. So with no rotation and
no flips a stage move of +X µm moves the image by -X / pixel_size px along x (as on
real microscopes and the Micro-Manager demo), and moving the stage by the drift
(``s = d``) holds the image still.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pymmcore_plus.experimental.unicore import (
    SimpleCameraDevice,
    UniMMCore,
    XYStageDevice,
)

from stagelock.synthetic import CameraNoise, sample_image

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = [
    "CAMERA_LABEL",
    "XY_STAGE_LABEL",
    "DriftModel",
    "SimulatedCamera",
    "SimulatedMicroscope",
    "SimulatedXYStage",
    "SimulationSettings",
    "create_simulated_core",
]

logger = logging.getLogger(__name__)

CAMERA_LABEL = "Camera"
XY_STAGE_LABEL = "XYStage"
PIXEL_CONFIG = "stagelock-sim"

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class SimulationSettings:
    """Parameters of the simulated microscope (all have defaults).

    Attributes
    ----------
    shape_px : (rows, cols)
        Camera sensor size.
    pixel_size_um : float
        Sample-plane size of one camera pixel.
    rotation_deg : float
        Rotation of the camera relative to the stage axes (counter-clockwise in
        (x = columns, y = rows) image coordinates).
    flip_x, flip_y : bool
        Mirror the stage's x / y axis as seen by the camera.
    exposure_ms : float
        Initial camera exposure; a snap takes this long.
    peak_photons : float
        Photo-electrons at the brightest point of the sample (sets the noise).
    creep_um_per_s : (x, y)
        Linear thermal creep of the sample.
    random_walk_um_per_sqrt_s : float
        Diffusion coefficient of the random-walk part of the drift, per axis.
    bump_every_s : float
        Mean interval between sudden steps of the sample (Poisson); 0 = never.
    bump_um : float
        Size of each step (random direction).
    stage_speed_um_per_s : float
        Stage travel speed (vector).
    stage_settle_ms : float
        Time the stage stays busy after reaching its target.
    stage_step_um : float
        Stage resolution: targets are rounded to multiples of this; 0 = exact.
    backlash_um : float
        Mechanical play per axis: after a direction reversal the sample does not
        follow the motor for this distance.
    travel_range_um : (xmin, xmax, ymin, ymax), optional
        Stage travel limits (motor coordinates); moves outside raise.
    seed : int
        Seed of the drift and the camera noise.
    """

    shape_px: tuple[int, int] = (512, 512)
    pixel_size_um: float = 0.65
    rotation_deg: float = 0.0
    flip_x: bool = False
    flip_y: bool = False
    exposure_ms: float = 10.0
    peak_photons: float = 500.0
    creep_um_per_s: tuple[float, float] = (0.05, -0.03)
    random_walk_um_per_sqrt_s: float = 0.02
    bump_every_s: float = 0.0
    bump_um: float = 2.0
    stage_speed_um_per_s: float = 200.0
    stage_settle_ms: float = 20.0
    stage_step_um: float = 0.01
    backlash_um: float = 0.0
    travel_range_um: tuple[float, float, float, float] | None = None
    seed: int = 0

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> SimulationSettings:
        """Validate a settings mapping (e.g. a TOML table).

        Raises
        ------
        ValueError
            On an unknown key (named in the message) or an invalid value.
        """
        settings = dict(settings or {})
        known = {f.name for f in fields(cls)}
        for key in settings:
            if key not in known:
                raise ValueError(
                    f"unknown simulated-microscope setting {key!r}; "
                    f"known: {', '.join(sorted(known))}"
                )
        kwargs: dict[str, Any] = {}
        for key, value in settings.items():
            if key in ("shape_px", "creep_um_per_s"):
                kwargs[key] = _pair(key, value)
            elif key == "travel_range_um":
                kwargs[key] = None if value is None else _quad(key, value)
            elif key in ("flip_x", "flip_y"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false; got {value!r}")
                kwargs[key] = value
            elif key == "seed":
                kwargs[key] = int(value)
            else:
                kwargs[key] = _number(key, value)
        out = cls(**kwargs)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise ValueError when a value is out of range."""
        rows, cols = self.shape_px
        if rows < 16 or cols < 16 or rows != int(rows) or cols != int(cols):
            raise ValueError(
                f"shape_px must be two integers >= 16; got {self.shape_px}"
            )
        positive = (
            "pixel_size_um",
            "exposure_ms",
            "peak_photons",
            "stage_speed_um_per_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        non_negative = (
            "random_walk_um_per_sqrt_s",
            "bump_every_s",
            "bump_um",
            "stage_settle_ms",
            "stage_step_um",
            "backlash_um",
        )
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")

    @property
    def camera_matrix(self) -> npt.NDArray[np.float64]:
        """2×2 matrix taking a sample displacement in µm to an image shift in px."""
        theta = math.radians(self.rotation_deg)
        rot = np.array(
            [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
        )
        flips = np.diag([-1.0 if self.flip_x else 1.0, -1.0 if self.flip_y else 1.0])
        return np.asarray(rot @ flips / self.pixel_size_um, dtype=np.float64)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite; got {value!r}")
    return float(value)


def _pair(key: str, value: Any) -> tuple[Any, Any]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a pair [a, b]; got {value!r}") from None
    if key == "shape_px":
        return int(a), int(b)
    return _number(key, a), _number(key, b)


def _quad(key: str, value: Any) -> tuple[float, float, float, float]:
    try:
        a, b, c, d = (_number(key, v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{key} must be [xmin, xmax, ymin, ymax] in µm; got {value!r}"
        ) from None
    if not (a < b and c < d):
        raise ValueError(f"{key} must have xmin < xmax and ymin < ymax; got {value!r}")
    return a, b, c, d


class DriftModel:
    """Sample drift as a reproducible function of time: creep + random walk + bumps.

    Parameters
    ----------
    creep_um_per_s : (x, y)
        Linear creep.
    random_walk_um_per_sqrt_s : float
        Random-walk amplitude: the displacement after ``t`` seconds has a standard
        deviation of ``random_walk_um_per_sqrt_s * sqrt(t)`` per axis.
    bump_every_s : float
        Mean interval between bumps (Poisson process); 0 disables them.
    bump_um : float
        Length of each bump (uniformly random direction).
    seed : int
        The same seed gives the same trajectory, whatever the order of queries.

    Notes
    -----
    The random walk is generated lazily on a 50 ms grid, in chunks, from one
    seeded generator, and linearly interpolated between grid points; the bumps
    come from a second generator. Negative times are clamped to 0 (drift 0).
    """

    grid_s = 0.05
    chunk = 4096

    def __init__(
        self,
        *,
        creep_um_per_s: tuple[float, float] = (0.05, -0.03),
        random_walk_um_per_sqrt_s: float = 0.02,
        bump_every_s: float = 0.0,
        bump_um: float = 2.0,
        seed: int = 0,
    ) -> None:
        self.creep_um_per_s = (float(creep_um_per_s[0]), float(creep_um_per_s[1]))
        self.random_walk_um_per_sqrt_s = float(random_walk_um_per_sqrt_s)
        self.bump_every_s = float(bump_every_s)
        self.bump_um = float(bump_um)
        self._walk_rng = np.random.default_rng([seed, 1])
        self._bump_rng = np.random.default_rng([seed, 2])
        # random walk on the grid, in an array grown by doubling (amortised O(1))
        self._walk = np.zeros((self.chunk, 2))
        self._walk_len = 1
        self._bump_times: list[float] = []
        self._bump_sums: list[tuple[float, float]] = [(0.0, 0.0)]  # cumulative
        self._next_bump_s = self._draw_bump_interval()
        self._lock = threading.Lock()

    def _draw_bump_interval(self) -> float:
        if self.bump_every_s <= 0:
            return math.inf
        return float(self._bump_rng.exponential(self.bump_every_s))

    def _extend(self, t_s: float) -> None:
        """Make sure the random walk and the bump list cover ``t_s``."""
        need = math.ceil(t_s / self.grid_s) + 2
        sigma = self.random_walk_um_per_sqrt_s * math.sqrt(self.grid_s)
        while self._walk_len < need:
            n = self._walk_len
            if n + self.chunk > self._walk.shape[0]:
                grown = np.zeros((2 * self._walk.shape[0], 2))
                grown[:n] = self._walk[:n]
                self._walk = grown
            steps = self._walk_rng.normal(0.0, sigma, size=(self.chunk, 2))
            self._walk[n : n + self.chunk] = self._walk[n - 1] + np.cumsum(
                steps, axis=0
            )
            self._walk_len = n + self.chunk
        while self._next_bump_s <= t_s:
            angle = float(self._bump_rng.uniform(0.0, 2 * math.pi))
            self._bump_times.append(self._next_bump_s)
            last = self._bump_sums[-1]
            self._bump_sums.append(
                (
                    last[0] + self.bump_um * math.cos(angle),
                    last[1] + self.bump_um * math.sin(angle),
                )
            )
            self._next_bump_s += self._draw_bump_interval()

    def drift_um(self, t_s: float) -> tuple[float, float]:
        """Return the sample displacement (x, y) in µm ``t_s`` seconds after start.

        Parameters
        ----------
        t_s : float
            Seconds since the start of the simulation.

        Returns
        -------
        (dx_um, dy_um) : tuple of float
        """
        t = max(0.0, float(t_s))
        with self._lock:
            self._extend(t)
            pos = t / self.grid_s
            i = int(pos)
            frac = pos - i
            walk = self._walk[i] * (1.0 - frac) + self._walk[i + 1] * frac
            bx, by = self._bump_sums[bisect.bisect_right(self._bump_times, t)]
        return (
            self.creep_um_per_s[0] * t + float(walk[0]) + bx,
            self.creep_um_per_s[1] * t + float(walk[1]) + by,
        )

    def bump_times_s(self, until_s: float) -> list[float]:
        """Return the times of the bumps up to ``until_s`` (tests, benchmarks)."""
        with self._lock:
            self._extend(until_s)
            return [b for b in self._bump_times if b <= until_s]


@dataclass(frozen=True, slots=True)
class _Move:
    """One straight stage move between physical (sample) positions."""

    start: tuple[float, float]
    end: tuple[float, float]
    motor_start: tuple[float, float]
    motor_end: tuple[float, float]
    t_start: float
    t_end: float


class _StageMechanics:
    """Stage kinematics: speed, settle, quantisation, backlash (monotonic time).

    ``motor`` is where the controller thinks it is (what ``getXYPosition``
    reports, before the user origin); ``sample`` is where the stage really moved
    the sample, lagging by the backlash after a reversal.
    """

    def __init__(self, settings: SimulationSettings) -> None:
        self.speed = settings.stage_speed_um_per_s
        self.settle_s = settings.stage_settle_ms / 1000.0
        self.step = settings.stage_step_um
        self.backlash = settings.backlash_um
        self.limits = settings.travel_range_um
        self._lock = threading.Lock()
        now = time.monotonic()
        self._move = _Move((0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), now, now)
        self._settled_at = now

    def quantise(self, value: float) -> float:
        if self.step <= 0:
            return value
        return round(value / self.step) * self.step

    @staticmethod
    def _interp(
        a: tuple[float, float], b: tuple[float, float], frac: float
    ) -> tuple[float, float]:
        return (a[0] + (b[0] - a[0]) * frac, a[1] + (b[1] - a[1]) * frac)

    def _frac(self, move: _Move, now: float) -> float:
        if move.t_end <= move.t_start or now >= move.t_end:
            return 1.0
        return max(0.0, (now - move.t_start) / (move.t_end - move.t_start))

    def positions(self, now: float | None = None) -> tuple[tuple[float, float], ...]:
        """(motor, sample) positions at ``now``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            move = self._move
        frac = self._frac(move, now)
        motor = self._interp(move.motor_start, move.motor_end, frac)
        sample = self._interp(move.start, move.end, frac)
        return motor, sample

    def move_to(self, x_um: float, y_um: float) -> None:
        """Start a move of the motor to (x, y); returns immediately."""
        target = (self.quantise(float(x_um)), self.quantise(float(y_um)))
        if self.limits is not None:
            xmin, xmax, ymin, ymax = self.limits
            if not (xmin <= target[0] <= xmax and ymin <= target[1] <= ymax):
                raise ValueError(
                    f"XY target ({target[0]:.3f}, {target[1]:.3f}) µm is outside the "
                    f"travel range x {xmin}..{xmax}, y {ymin}..{ymax} µm"
                )
        now = time.monotonic()
        motor, sample = self.positions(now)
        # backlash as a play operator: the sample follows the motor only once
        # the motor has taken up the play on that axis
        half = self.backlash / 2.0
        end = tuple(
            min(max(s, t - half), t + half) for s, t in zip(sample, target, strict=True)
        )
        distance = math.hypot(target[0] - motor[0], target[1] - motor[1])
        duration = distance / self.speed
        with self._lock:
            self._move = _Move(
                sample, (end[0], end[1]), motor, target, now, now + duration
            )
            self._settled_at = now + duration + (self.settle_s if distance > 0 else 0.0)

    def stop(self) -> None:
        """Halt where the stage is now."""
        now = time.monotonic()
        motor, sample = self.positions(now)
        with self._lock:
            self._move = _Move(sample, sample, motor, motor, now, now)
            self._settled_at = now

    def busy(self) -> bool:
        """Return True while moving or settling."""
        with self._lock:
            return time.monotonic() < self._settled_at


class SimulatedXYStage(XYStageDevice):
    """A Python XY stage with finite speed, settle time, quantisation, backlash.

    Moves are non-blocking (``setXYPosition`` returns at once; the position then
    travels towards the target and ``deviceBusy`` stays true until it has settled),
    like real stage adapters; use ``core.waitForDevice(label)``.
    """

    def __init__(self, mechanics: _StageMechanics) -> None:
        super().__init__()
        self._mech = mechanics
        self._origin = [0.0, 0.0]

    def set_position_um(self, x: float, y: float) -> None:
        """Start a move to (x, y) µm in user coordinates."""
        self._mech.move_to(x + self._origin[0], y + self._origin[1])
        # like the C++ stage adapters, announce the new target (GUIs listen)
        with contextlib.suppress(Exception):
            self.core.events.XYStagePositionChanged.emit(self.get_label(), x, y)

    def get_position_um(self) -> tuple[float, float]:
        """Return the motor position in user coordinates (µm), on the step grid."""
        motor, _ = self._mech.positions()
        x = self._mech.quantise(motor[0]) - self._origin[0]
        y = self._mech.quantise(motor[1]) - self._origin[1]
        return (round(x, 6), round(y, 6))

    def set_origin_x(self) -> None:
        """Make the current x the user zero."""
        self._origin[0] = self._mech.positions()[0][0]

    def set_origin_y(self) -> None:
        """Make the current y the user zero."""
        self._origin[1] = self._mech.positions()[0][1]

    def home(self) -> None:
        """Move to the motor zero."""
        self._mech.move_to(0.0, 0.0)

    def stop(self) -> None:
        """Halt at the current position."""
        self._mech.stop()

    def busy(self) -> bool:
        """Return True while moving or settling."""
        return self._mech.busy()


class SimulatedCamera(SimpleCameraDevice):
    """A Python sCMOS-like camera imaging the simulated sample (uint16)."""

    def __init__(self, microscope: SimulatedMicroscope) -> None:
        super().__init__()
        self._scope = microscope
        self._exposure_ms = microscope.settings.exposure_ms

    def get_exposure(self) -> float:
        """Exposure in ms."""
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        """Set the exposure in ms (> 0)."""
        if not exposure > 0:
            raise ValueError(f"exposure must be > 0 ms; got {exposure}")
        self._exposure_ms = float(exposure)

    def sensor_shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return self._scope.settings.shape_px

    def dtype(self) -> DTypeLike:
        """uint16."""
        return np.uint16

    def snap(self, buffer: npt.NDArray[Any]) -> Mapping[str, Any]:
        """Expose for the exposure time and fill ``buffer`` with the image."""
        if self._scope.camera_fault is not None:
            raise RuntimeError(self._scope.camera_fault)
        t0 = time.monotonic()
        exposure_s = self._exposure_ms / 1000.0
        image, shift = self._scope.render(mid_exposure_offset_s=exposure_s / 2)
        buffer[:] = image
        # a real camera takes its exposure time: without this a sequence would
        # produce frames as fast as numpy renders them and fill the ring buffer
        remaining = exposure_s - (time.monotonic() - t0)
        if remaining > 0:
            time.sleep(remaining)
        return {"SimTrueDxPx": f"{shift[0]:.4f}", "SimTrueDyPx": f"{shift[1]:.4f}"}


class SimulatedMicroscope:
    """A simulated microscope (camera + XY stage + drifting sample) on a ``UniMMCore``.

    Parameters
    ----------
    settings : mapping or SimulationSettings, optional
        See :class:`SimulationSettings` for the keys; unknown keys raise.
    clock : callable returning seconds, optional
        Time source of the *drift* (default ``time.monotonic``); pass a simulated
        clock to run the drift faster than real time. Stage motion and exposure
        always use real time.
    core : UniMMCore, optional
        Load the devices into this core instead of a new one.

    Attributes
    ----------
    core : UniMMCore
        The core with ``"Camera"`` and ``"XYStage"`` loaded and selected, auto
        shutter off and the pixel size set.
    settings : SimulationSettings
    drift : DriftModel
    camera_fault : str or None
        Set to a message to make every snap fail with ``RuntimeError(message)``
        (a disconnected camera); None (default) for a working camera.
    """

    camera_fault: str | None = None
    last_true_shift_px: tuple[float, float] | None = None
    """True image shift (dx, dy) of the most recently rendered frame."""

    def __init__(
        self,
        settings: Mapping[str, Any] | SimulationSettings | None = None,
        *,
        clock: Clock | None = None,
        core: UniMMCore | None = None,
    ) -> None:
        if isinstance(settings, SimulationSettings):
            settings.validate()
            self.settings = settings
        else:
            self.settings = SimulationSettings.from_mapping(settings)
        s = self.settings
        self._clock: Clock = clock or time.monotonic
        self._t0 = self._clock()
        self.drift = DriftModel(
            creep_um_per_s=s.creep_um_per_s,
            random_walk_um_per_sqrt_s=s.random_walk_um_per_sqrt_s,
            bump_every_s=s.bump_every_s,
            bump_um=s.bump_um,
            seed=s.seed,
        )
        self.noise = CameraNoise(peak_photons=s.peak_photons)
        self._rng = np.random.default_rng([s.seed, 3])
        self._rng_lock = threading.Lock()
        self._matrix = s.camera_matrix
        self._prepare_world()
        self._mechanics = _StageMechanics(s)
        self.stage = SimulatedXYStage(self._mechanics)
        self.camera = SimulatedCamera(self)
        self.core = core if core is not None else UniMMCore()
        self.core.loadPyDevice(CAMERA_LABEL, self.camera)
        self.core.loadPyDevice(XY_STAGE_LABEL, self.stage)
        self.core.initializeAllDevices()
        self.core.setCameraDevice(CAMERA_LABEL)
        self.core.setXYStageDevice(XY_STAGE_LABEL)
        # no shutter in this microscope: without this an MDA asks for device ""
        self.core.setAutoShutter(False)
        # pixel-size configs keyed on Python-device properties never match, so
        # define one with no property and select it
        self.core.definePixelSizeConfig(PIXEL_CONFIG)
        self.core.setPixelSizeUm(PIXEL_CONFIG, s.pixel_size_um)
        self.core.setPixelSizeConfig(PIXEL_CONFIG)

    # -- time and truth -----------------------------------------------------

    def elapsed_s(self) -> float:
        """Seconds of the drift clock since the microscope was created."""
        return self._clock() - self._t0

    def true_drift_um(self, t_s: float | None = None) -> tuple[float, float]:
        """Return the sample drift (x, y) µm at ``t_s`` (default: now) since start."""
        return self.drift.drift_um(self.elapsed_s() if t_s is None else t_s)

    def stage_sample_position_um(self) -> tuple[float, float]:
        """Where the stage really is (motor frame, includes backlash lag), µm."""
        return self._mechanics.positions()[1]

    def image_shift_px(
        self, displacement_um: tuple[float, float]
    ) -> tuple[float, float]:
        """Image shift (dx, dy) px caused by a sample displacement (x, y) µm.

        A stage move of ``m`` µm is a sample displacement of ``-m``.
        """
        v = self._matrix @ np.asarray(displacement_um, dtype=np.float64)
        return float(v[0]), float(v[1])

    def true_image_shift_px(self, t_s: float | None = None) -> tuple[float, float]:
        """Displacement (dx, dy) px of the image content now (or at ``t_s``).

        Relative to the image at zero drift and zero stage position; the
        difference between two frames' values is what a registration measures.
        """
        drift = self.true_drift_um(t_s)
        stage = self.stage_sample_position_um()
        return self.image_shift_px((drift[0] - stage[0], drift[1] - stage[1]))

    # -- rendering ------------------------------------------------------------

    def _prepare_world(self) -> None:
        rows, cols = self.settings.shape_px
        # the world is bigger than the frame so moderate moves bring new, real
        # sample into view; beyond it the texture is mirror-repeated
        self._margin_px = 32
        pad = max(256, max(rows, cols) // 2)
        self._world = sample_image((rows + 2 * pad, cols + 2 * pad)).astype(np.float64)
        self._world_origin = (pad, pad)
        h = rows + 2 * self._margin_px
        w = cols + 2 * self._margin_px
        self._ky = np.fft.fftfreq(h)[:, None]
        self._kx = np.fft.rfftfreq(w)[None, :]

    @staticmethod
    def _reflect(index: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.int64]:
        period = 2 * n
        i = np.mod(index, period)
        return np.where(i < n, i, period - 1 - i)

    def render_clean(self, dx_px: float, dy_px: float) -> npt.NDArray[np.float64]:
        """Render the noiseless image with the content displaced by (dx, dy) px.

        Integer part by cropping the world, fractional part by an exact Fourier
        phase ramp on a crop with a margin that is then discarded.
        """
        rows, cols = self.settings.shape_px
        m = self._margin_px
        ix, iy = math.floor(dx_px), math.floor(dy_px)
        fx, fy = dx_px - ix, dy_px - iy
        r0 = self._world_origin[0] - iy - m
        c0 = self._world_origin[1] - ix - m
        r_idx = self._reflect(np.arange(r0, r0 + rows + 2 * m), self._world.shape[0])
        c_idx = self._reflect(np.arange(c0, c0 + cols + 2 * m), self._world.shape[1])
        crop = self._world[np.ix_(r_idx, c_idx)]
        if fx or fy:
            spectrum = np.fft.rfft2(crop)
            # the phase ramp is separable: two 1-D exponentials, not one 2-D
            spectrum *= np.exp(-2j * np.pi * self._ky * fy)
            spectrum *= np.exp(-2j * np.pi * self._kx * fx)
            crop = np.fft.irfft2(spectrum, s=crop.shape)
        return np.asarray(crop[m : m + rows, m : m + cols])

    def render(
        self, *, mid_exposure_offset_s: float = 0.0
    ) -> tuple[npt.NDArray[np.uint16], tuple[float, float]]:
        """One noisy camera frame of the current scene, and its true shift (dx, dy)."""
        shift = self.true_image_shift_px(self.elapsed_s() + mid_exposure_offset_s)
        self.last_true_shift_px = shift
        clean = self.render_clean(*shift)
        with self._rng_lock:
            z = self._rng.standard_normal(clean.shape, dtype=np.float32)
        return self._expose(clean, z), shift

    def _expose(
        self, clean: npt.NDArray[np.float64], z: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.uint16]:
        """Apply the camera noise of :attr:`noise` to a clean image in [0, 1].

        Shot noise and read noise are drawn together as one Gaussian of variance
        ``electrons + read_noise²`` (the normal approximation of
        :meth:`CameraNoise.expose`'s Poisson + Gaussian): statistically the same
        for registration at these photon counts, and 5-10x faster, which keeps a
        512x512 camera at video rate.
        """
        n = self.noise
        electrons = np.clip(clean, 0.0, None).astype(np.float32)
        electrons *= n.peak_photons
        electrons += n.background_photons
        sigma = np.sqrt(electrons + n.read_noise_e**2)
        electrons += sigma * z
        electrons *= 1.0 / n.gain_e_per_adu
        electrons += n.offset_adu
        np.rint(electrons, out=electrons)
        np.clip(electrons, 0, 65535, out=electrons)
        return electrons.astype(np.uint16)

    def close(self) -> None:
        """Unload the devices from the core (see :func:`release_core`)."""
        try:
            self.core.unloadAllDevices()
        except Exception:  # pragma: no cover - teardown must not raise
            logger.exception("unloading the simulated devices failed")


def create_simulated_core(
    settings: Mapping[str, Any] | None = None, *, clock: Clock | None = None
) -> UniMMCore:
    """Create a ``UniMMCore`` with simulated ``"Camera"`` and ``"XYStage"`` devices.

    Parameters
    ----------
    settings : mapping, optional
        Simulation settings; see :class:`SimulationSettings` for the keys.
    clock : callable returning seconds, optional
        Time source of the drift (default ``time.monotonic``).

    Returns
    -------
    UniMMCore
        The core; the simulation object is ``core.stagelock_simulation``
        (a :class:`SimulatedMicroscope`), for the true drift and geometry.

    Raises
    ------
    ValueError
        On an unknown settings key or an invalid value.
    """
    scope = SimulatedMicroscope(settings, clock=clock)
    core = scope.core
    # the simulation travels with the core so a caller holding only the core can
    # still ask for the truth
    core.stagelock_simulation = scope  # type: ignore[attr-defined]
    return core
