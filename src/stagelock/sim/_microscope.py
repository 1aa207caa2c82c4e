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
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pymmcore_plus.experimental.unicore import (
    SimpleCameraDevice,
    UniMMCore,
    XYStageDevice,
)

from stagelock.config import SimulationSettings

from ._stage import StageMechanics
from ._synthetic import CameraNoise, sample_image

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = [
    "CAMERA_LABEL",
    "XY_STAGE_LABEL",
    "DriftModel",
    "SimulatedCamera",
    "SimulatedCore",
    "SimulatedMicroscope",
    "SimulatedXYStage",
    "create_simulated_core",
]

logger = logging.getLogger(__name__)

CAMERA_LABEL = "Camera"
XY_STAGE_LABEL = "XYStage"
PIXEL_CONFIG = "stagelock-sim"

Clock = Callable[[], float]


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


class SimulatedXYStage(XYStageDevice):
    """A Python XY stage with finite speed, settle time, quantisation, backlash.

    Moves are non-blocking (``setXYPosition`` returns at once; the position then
    travels towards the target and ``deviceBusy`` stays true until it has settled),
    like real stage adapters; use ``core.waitForDevice(label)``.
    """

    def __init__(self, mechanics: StageMechanics) -> None:
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
        self.settings = (
            settings
            if isinstance(settings, SimulationSettings)
            else SimulationSettings.from_mapping(settings)
        )
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
        self._mechanics = StageMechanics.from_settings(s)
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
        pad = self.settings.world_pad_px or max(256, max(rows, cols) // 2)
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


class SimulatedCore(UniMMCore):
    """A ``UniMMCore`` that carries its simulated microscope, and so the truth.

    Attributes
    ----------
    simulation : SimulatedMicroscope
        The camera, stage and drifting sample behind this core (true drift,
        geometry); set by :func:`create_simulated_core`.
    """

    simulation: SimulatedMicroscope


def create_simulated_core(
    settings: Mapping[str, Any] | SimulationSettings | None = None,
    *,
    clock: Clock | None = None,
) -> SimulatedCore:
    """Create a ``UniMMCore`` with simulated ``"Camera"`` and ``"XYStage"`` devices.

    Parameters
    ----------
    settings : mapping, optional
        Simulation settings; see :class:`SimulationSettings` for the keys.
    clock : callable returning seconds, optional
        Time source of the drift (default ``time.monotonic``).

    Returns
    -------
    SimulatedCore
        The core; its ``simulation`` (a :class:`SimulatedMicroscope`) knows the
        true drift and geometry.

    Raises
    ------
    ValueError
        On an unknown settings key or an invalid value.
    """
    with _no_adapter_search_error():
        core = SimulatedCore()
    core.simulation = SimulatedMicroscope(settings, clock=clock, core=core)
    return core


_NO_MM_MESSAGE = "Could not find a compatible Micro-Manager installation"
"""What pymmcore-plus logs (as an error, with 'run mmcore install') when it finds
no compiled device adapters; the simulated microscope needs none."""


def _drop_no_mm(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NO_MM_MESSAGE)


@contextlib.contextmanager
def _no_adapter_search_error() -> Iterator[None]:
    """Silence only pymmcore-plus's "no Micro-Manager installation" error.

    A new core searches for compiled adapters and logs that error (in red,
    naming a download) when there are none; the simulated core's devices are
    Python, so the message would only frighten.
    """
    log = logging.getLogger("pymmcore-plus")
    log.addFilter(_drop_no_mm)
    try:
        yield
    finally:
        log.removeFilter(_drop_no_mm)
