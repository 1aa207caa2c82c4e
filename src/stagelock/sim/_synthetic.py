"""Synthetic drifting movies with known ground truth, from a real sample image.

Used by the example stack, the simulated microscope, the tests and the benchmark.
Shifts are applied as exact Fourier phase ramps on a mirror-extended canvas, so a
sub-pixel shift involves no interpolation and the truth is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "CameraNoise",
    "drifting_stack",
    "fourier_shift",
    "random_drift",
    "sample_image",
]


def sample_image(shape: tuple[int, int] | None = None) -> npt.NDArray[np.float32]:
    """Load the bundled real sample (a stained tissue section) as float32 in [0, 1].

    Parameters
    ----------
    shape : (rows, cols), optional
        Resize (bicubic, mirror-tiled when larger than 2x) to this shape. Default:
        the native 512x512.
    """
    data = resources.files("stagelock").joinpath("data/ihc.png").read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:  # pragma: no cover - a broken installation
        raise RuntimeError(
            "the bundled sample image stagelock/data/ihc.png is unreadable"
        )
    out: npt.NDArray[np.float32] = image.astype(np.float32) / np.float32(255.0)
    if shape is not None and tuple(shape) != out.shape:
        rows, cols = int(shape[0]), int(shape[1])
        factor = max(rows, cols) / 512.0
        if factor > 1.0:
            # upscale by at most 3x and mirror-tile the rest: keeps the texture
            # at a microscope-like scale without an exact periodic repeat
            up = min(factor, 3.0)
            size = round(512 * up)
            out = np.asarray(
                cv2.resize(out, (size, size), interpolation=cv2.INTER_CUBIC),
                dtype=np.float32,
            )
        pad_r, pad_c = max(0, rows - out.shape[0]), max(0, cols - out.shape[1])
        if pad_r or pad_c:
            out = np.pad(out, ((0, pad_r), (0, pad_c)), mode="symmetric")
        out = np.ascontiguousarray(out[:rows, :cols])
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def fourier_shift(
    image: npt.NDArray[np.floating], dx_px: float, dy_px: float, *, margin_px: int = 64
) -> npt.NDArray[np.float32]:
    """Translate ``image`` by (dx, dy) px exactly (band-limited), same shape.

    The content moves by +dx along columns and +dy along rows. The image is
    mirror-extended by ``margin_px`` first so nothing wraps around from the
    opposite edge.
    """
    m = int(margin_px)
    canvas = np.pad(np.asarray(image, dtype=np.float64), m, mode="symmetric")
    rows, cols = canvas.shape
    ky = np.fft.fftfreq(rows)[:, None]
    kx = np.fft.rfftfreq(cols)[None, :]
    spectrum = np.fft.rfft2(canvas)
    spectrum *= np.exp(-2j * np.pi * (ky * dy_px + kx * dx_px))
    out = np.fft.irfft2(spectrum, s=canvas.shape)
    return out[m : m + image.shape[0], m : m + image.shape[1]].astype(np.float32)


@dataclass(frozen=True, slots=True)
class CameraNoise:
    """An sCMOS-like camera: Poisson shot noise, Gaussian read noise, offset, gain.

    Attributes
    ----------
    peak_photons : float
        Photo-electrons at the brightest point of the sample (1.0 in the image).
    background_photons : float
        Photo-electrons everywhere (autofluorescence, stray light).
    read_noise_e : float
        Read noise, electrons RMS.
    gain_e_per_adu : float
        Electrons per ADU.
    offset_adu : float
        Camera offset.
    """

    peak_photons: float = 500.0
    background_photons: float = 5.0
    read_noise_e: float = 1.6
    gain_e_per_adu: float = 0.46
    offset_adu: float = 100.0

    def expose(
        self, image: npt.NDArray[np.floating], rng: np.random.Generator
    ) -> npt.NDArray[np.uint16]:
        """Turn a clean image in [0, 1] into one noisy uint16 camera frame."""
        electrons = (
            np.clip(image, 0.0, None) * self.peak_photons + self.background_photons
        )
        counts = rng.poisson(electrons).astype(np.float64)
        counts += rng.normal(0.0, self.read_noise_e, size=counts.shape)
        adu = counts / self.gain_e_per_adu + self.offset_adu
        out: npt.NDArray[np.uint16] = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)
        return out


def random_drift(
    n_frames: int,
    *,
    creep_px_per_frame: tuple[float, float] = (0.05, -0.03),
    walk_px: float = 0.15,
    seed: int = 0,
) -> npt.NDArray[np.float64]:
    """Draw a drift trajectory: linear creep plus a random walk, (T, 2) of (dx, dy).

    Frame 0 is at (0, 0).
    """
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, walk_px, size=(n_frames, 2)) + np.asarray(
        creep_px_per_frame
    )
    steps[0] = 0.0
    return np.cumsum(steps, axis=0)


def drifting_stack(
    shifts: npt.ArrayLike,
    *,
    shape: tuple[int, int] = (512, 512),
    noise: CameraNoise | None = CameraNoise(),
    image: npt.NDArray[np.floating] | None = None,
    seed: int = 0,
) -> npt.NDArray[np.generic]:
    """Render a (T, H, W) movie of the sample displaced by ``shifts`` (T, 2) = (dx, dy).

    With ``noise=None`` the frames are the clean float32 images; otherwise uint16
    camera frames.
    """
    truth = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
    base = sample_image(shape) if image is None else np.asarray(image, dtype=np.float32)
    rng = np.random.default_rng(seed)
    frames = []
    for dx, dy in truth:
        clean = fourier_shift(base, float(dx), float(dy))
        frames.append(clean if noise is None else noise.expose(clean, rng))
    return np.stack(frames)
