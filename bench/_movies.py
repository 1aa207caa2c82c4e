"""Drifting microscope movies with exact sub-pixel ground truth, cached on disk.

Convention (the same as stagelock's): ``truth[t] = (dx, dy)`` is the displacement
of the sample in frame ``t`` relative to frame 0, in pixels, ``+x`` = increasing
column, ``+y`` = increasing row, so ``frame_t(x, y) = frame_0(x - dx, y - dy)``
before noise.  Frame 0 is always at (0, 0).

A frame is made in three steps:

1. The base image (grey, scaled to [0, 1]) is upscaled by a small integer factor
   when the movie is larger than the image (the factor keeps the mirror period
   above 1.25x the canvas, so no exact translational repeat exists in a frame)
   and mirror-padded to a ``size + 2 * MARGIN_PX`` canvas.
2. The canvas is mirror-extended to 2x (an exactly periodic, continuous image),
   its spectrum is computed once, and each frame is a phase ramp times that
   spectrum, inverse-transformed and cropped to the central window: no
   interpolation blur and no wrap-around enter the frame.
3. Bleaching scales the signal, transient debris blobs are added in the frame's
   own coordinates (they do not move with the sample), and
   ``stagelock.sim.CameraNoise`` turns photons into sCMOS uint16 frames.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from collections.abc import Callable

GENERATOR_VERSION = 2
MARGIN_PX = 32  # canvas margin; must exceed the largest drift (15 px) + a guard
SEED = 20261127
LEVELS = {"p5000": 5000.0, "p500": 500.0, "p50": 50.0}
NOISELESS_PEAK_ADU = 20000.0
PC12_PATH = Path(os.environ.get("STAGELOCK_PC12", "/work/shared/data/pc12-unreg.tif"))
PC12_REG_PATH = PC12_PATH.with_name("pc12-reg-translation.tif")

#: base images: what each one is, for the README table
IMAGES = {
    "ihc": "scikit-image `immunohistochemistry()` (brightfield tissue, grey)",
    "cell": "scikit-image `cell()` (one cell, low texture, off-centre)",
    "spots": "scikit-image `hubble_deep_field()` (sparse points: stand-in for beads)",
    "sample": "`stagelock.sim.sample_image()` (the bundled stained section)",
    "lattice": "generated hexagonal lattice of spots, period 14 px, 8 % vacancies, "
    "0.3 px jitter (periodic texture: capture-range ambiguity test)",
    "pc12": "frame 0 of the real PC12 time-lapse `pc12-unreg.tif` (201×199)",
}


def default_data_dir() -> Path:
    return Path(os.environ.get("STAGELOCK_BENCH_DATA", "/tmp/stagelock-bench"))


@dataclass(frozen=True)
class MovieSpec:
    """Everything that determines one movie (and its cache key)."""

    image: str
    size: int
    frames: int
    level: str  # a key of LEVELS or "noiseless"
    bleach: float = 0.0  # fraction of the signal lost by the last frame
    debris: bool = False  # transient bright blobs on ~5 % of frames
    drift: str = "walk"  # "walk" or "sweep"
    max_drift_px: float = 15.0

    @property
    def name(self) -> str:
        parts = [self.image, str(self.size), self.level]
        if self.drift != "walk":
            parts.append(self.drift)
        if self.bleach or self.debris:
            parts.append("bb")
        return "-".join(parts)


# ----------------------------------------------------------------------------- images


def _normalise(image: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, [0.1, 99.9])
    return np.asarray(np.clip((img - lo) / max(hi - lo, 1e-12), 0.0, 1.0), np.float64)


def lattice_image(size: int, seed: int = 7) -> npt.NDArray[np.float64]:
    """Hexagonal lattice of Gaussian spots with vacancies, jitter and brighter spots.

    The period (14 px) is below the drift range, so a correlation peak one lattice
    vector away is almost as high as the true one: only the defects say which
    is right.
    """
    import cv2

    rng = np.random.default_rng(seed)
    period = 14.0
    rows = np.arange(-1, size / (period * np.sqrt(3) / 2) + 2)
    ys, xs = [], []
    for r in rows:
        y = r * period * np.sqrt(3) / 2
        x = np.arange(-1, size / period + 2) * period + (period / 2 if r % 2 else 0.0)
        xs.append(x)
        ys.append(np.full_like(x, y))
    x = np.concatenate(xs) + rng.normal(0, 0.3, sum(map(len, xs)))
    y = np.concatenate(ys) + rng.normal(0, 0.3, len(x))
    keep = rng.random(len(x)) > 0.08  # vacancies
    amp = np.where(rng.random(len(x)) < 0.03, 1.6, 1.0) * rng.uniform(0.85, 1.0, len(x))
    x, y, amp = x[keep], y[keep], amp[keep]
    inside = (x >= 0) & (x < size - 1) & (y >= 0) & (y < size - 1)
    x, y, amp = x[inside], y[inside], amp[inside]
    # bilinear splat of sub-pixel positions, then a Gaussian PSF
    img = np.zeros((size, size))
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    for oy, ox, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (0, 1, fx * (1 - fy)),
        (1, 0, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        np.add.at(img, (y0 + oy, x0 + ox), amp * w)
    blurred = np.asarray(cv2.GaussianBlur(img, (0, 0), 2.2), dtype=np.float64)
    return np.clip(blurred / np.percentile(blurred, 99.9), 0.0, 1.0)


def load_base(image: str) -> npt.NDArray[np.float64]:
    """The base image, grey float64 in [0, 1] (lattice is made per size)."""
    if image == "sample":
        from stagelock.sim import sample_image

        return _normalise(sample_image())
    if image == "pc12":
        import tifffile

        return _normalise(tifffile.imread(PC12_PATH)[0].astype(np.float64))
    import skimage.data as skd
    from skimage.color import rgb2gray

    loader = {
        "ihc": "immunohistochemistry",
        "cell": "cell",
        "spots": "hubble_deep_field",
    }
    img = getattr(skd, loader[image])()
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    return _normalise(img)


def make_canvas(image: str, size: int) -> tuple[npt.NDArray[np.float64], int]:
    """Base image scaled and mirror-padded to (size + 2 margin)^2; (canvas, upscale)."""
    import cv2

    need = size + 2 * MARGIN_PX
    if image == "lattice":
        return lattice_image(need), 1
    base = load_base(image)
    factor = 1
    while 2 * factor * min(base.shape) < 1.25 * need:
        factor += 1
    if factor > 1:
        h, w = base.shape
        big = cv2.resize(base, (w * factor, h * factor), interpolation=cv2.INTER_CUBIC)
        base = np.clip(np.asarray(big, dtype=np.float64), 0.0, 1.0)
    h, w = base.shape
    y0, x0 = max(0, (h - need) // 2), max(0, (w - need) // 2)
    base = base[y0 : y0 + need, x0 : x0 + need]
    ph, pw = need - base.shape[0], need - base.shape[1]
    if ph or pw:
        base = np.pad(
            base, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), "symmetric"
        )
    return base, factor


class Shifter:
    """Exact band-limited translation of a canvas, cropped to its central window."""

    def __init__(self, canvas: npt.NDArray[np.float64], size: int) -> None:
        import scipy.fft

        self._fft = scipy.fft
        self.size = size
        ext = np.block(
            [[canvas, canvas[:, ::-1]], [canvas[::-1, :], canvas[::-1, ::-1]]]
        )
        self.shape = ext.shape
        spec = scipy.fft.rfft2(ext, workers=-1)
        # zero the Nyquist row/column: a phase ramp there would break Hermitian symmetry
        spec[ext.shape[0] // 2, :] = 0
        spec[:, -1] = 0
        self.spec = spec
        self.ky = np.fft.fftfreq(ext.shape[0])[:, None]
        self.kx = np.fft.rfftfreq(ext.shape[1])[None, :]

    def __call__(self, dx: float, dy: float) -> npt.NDArray[np.float64]:
        if max(abs(dx), abs(dy)) > MARGIN_PX - 4:
            raise ValueError(f"shift ({dx:.1f}, {dy:.1f}) exceeds the canvas margin")
        ramp = np.exp(-2j * np.pi * (self.ky * dy)) * np.exp(
            -2j * np.pi * (self.kx * dx)
        )
        out = self._fft.irfft2(self.spec * ramp, s=self.shape, workers=-1)
        m = MARGIN_PX
        return np.asarray(out[m : m + self.size, m : m + self.size])


# ----------------------------------------------------------------------------- drift


def seed_of(*parts: object) -> int:
    return (SEED + zlib.crc32("/".join(map(str, parts)).encode())) % 2**32


def walk_drift(frames: int, max_drift_px: float, seed: int) -> npt.NDArray[np.float64]:
    """Smooth random walk + linear trend, (T, 2) of (dx, dy), frame 0 at the origin."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, 1.0, (frames + 20, 2))
    kernel = np.hanning(11) / np.hanning(11).sum()
    walk = np.cumsum(steps, axis=0)
    walk = np.column_stack([np.convolve(walk[:, k], kernel, "same") for k in range(2)])
    walk = walk[10 : 10 + frames]
    walk -= walk[0]
    walk *= rng.uniform(3.0, 8.0, 2) / max(float(np.abs(walk).max()), 1e-9)
    trend = np.linspace(0.0, 1.0, frames)[:, None] * rng.uniform(-12.0, 12.0, 2)
    d = walk + trend
    peak = float(np.abs(d).max())
    if peak > max_drift_px:
        d *= max_drift_px / peak
    d[0] = 0.0
    return d


def sweep_drift() -> npt.NDArray[np.float64]:
    """Frame 0 at the origin, then (2 + f, -3 + f) for f = 0, 0.05, ..., 1."""
    f = np.round(np.arange(21) * 0.05, 10)
    return np.vstack([[0.0, 0.0], np.column_stack([2.0 + f, -3.0 + f])])


# ----------------------------------------------------------------------------- movies


def add_debris(
    clean: npt.NDArray[np.float64], rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """1-3 bright Gaussian blobs (sigma 2-6 % of the frame, 0.5-2x peak brightness)."""
    n = clean.shape[0]
    out = clean.copy()
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.1 * n, 0.9 * n, 2)
        sigma = rng.uniform(0.02, 0.06) * n
        amp = rng.uniform(0.5, 2.0)
        r0, r1 = int(max(0, cy - 4 * sigma)), int(min(n, cy + 4 * sigma + 1))
        c0, c1 = int(max(0, cx - 4 * sigma)), int(min(n, cx + 4 * sigma + 1))
        yy, xx = np.mgrid[r0:r1, c0:c1]
        out[r0:r1, c0:c1] += amp * np.exp(
            -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)
        )
    return out


def make_movie(
    spec: MovieSpec,
) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.float64], dict[str, object]]:
    """Build one movie: (uint16 (T, H, W), truth (T, 2) of (dx, dy), info)."""
    from stagelock.sim import CameraNoise

    canvas, factor = make_canvas(spec.image, spec.size)
    shifter = Shifter(canvas, spec.size)
    if spec.drift == "sweep":
        truth = sweep_drift()
    else:
        truth = walk_drift(
            spec.frames, spec.max_drift_px, seed_of("traj", spec.image, spec.size)
        )
    n = len(truth)
    rng = np.random.default_rng(seed_of("noise", spec.name, n))
    debris_at: list[int] = []
    if spec.debris:
        k = max(2, round(0.05 * n))
        debris_at = sorted(
            int(v) for v in rng.choice(np.arange(1, n), k, replace=False)
        )
    noise = CameraNoise(peak_photons=LEVELS.get(spec.level, 1.0))
    movie = np.empty((n, spec.size, spec.size), np.uint16)
    for i, (dx, dy) in enumerate(truth):
        clean = shifter(float(dx), float(dy))
        if spec.level == "noiseless":
            adu = clean * NOISELESS_PEAK_ADU + 100.0
            movie[i] = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)
            continue
        clean = np.clip(clean, 0.0, None) * (1.0 - spec.bleach * i / max(n - 1, 1))
        if i in debris_at:
            clean = add_debris(clean, rng)
        movie[i] = noise.expose(clean, rng)
    info: dict[str, object] = {"upscale": factor, "debris_frames": debris_at}
    return movie, truth, info


def movie_bound(spec: MovieSpec) -> dict[str, float] | None:
    """Cramér-Rao bound over the movie's frames 1..T-1 (noisy frame-0 reference).

    Each frame's own bound, from its noiseless content as the movie drew it:
    frame 0's content (a shift moves little information in or out) at the
    frame's bleached brightness, against the noisy, unbleached frame 0.
    ``rms_px`` is the RMS over the frames of those bounds (at most 16 frames,
    evenly spaced: the bleach is linear); ``frame0_rms_px`` is frame 0's
    alone, the bound of a movie that did not bleach. Transient debris is not
    modelled (it only removes information). None for noiseless movies.
    """
    first = frame0_bound(spec)
    if first is None or not spec.bleach:
        return None if first is None else {**first, "frame0_rms_px": first["rms_px"]}
    from stagelock.registration import camera_variance, shift_crlb
    from stagelock.sim import CameraNoise

    canvas, _factor = make_canvas(spec.image, spec.size)
    clean = np.clip(Shifter(canvas, spec.size)(0.0, 0.0), 0.0, None)
    cam = CameraNoise(peak_photons=LEVELS[spec.level])

    def variance(brightness: float) -> tuple[Any, Any]:
        electrons = clean * brightness * cam.peak_photons + cam.background_photons
        var = camera_variance(
            electrons, read_noise_e=cam.read_noise_e, gain_e_per_adu=cam.gain_e_per_adu
        )
        return electrons, var

    _e0, var0 = variance(1.0)
    n = spec.frames
    frames = np.unique(np.rint(np.linspace(1, n - 1, min(n - 1, 16))).astype(int))
    sx2, sy2 = [], []
    for i in frames:
        electrons, var = variance(1.0 - spec.bleach * i / max(n - 1, 1))
        b = shift_crlb(electrons / cam.gain_e_per_adu, var, reference_variance=var0)
        sx2.append(b.sigma_x_px**2)
        sy2.append(b.sigma_y_px**2)
    mx, my = float(np.mean(sx2)), float(np.mean(sy2))
    return {
        "rms_px": math.sqrt(mx + my),
        "sigma_x_px": math.sqrt(mx),
        "sigma_y_px": math.sqrt(my),
        "frame0_rms_px": first["rms_px"],
    }


def frame0_expected(
    spec: MovieSpec,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Noiseless frame 0 in ADU above the offset, and each pixel's variance (ADU²).

    The same canvas and crop as the movie, through the camera model of its level:
    variance = (expected electrons + read noise²) / gain².
    """
    from stagelock.registration import camera_variance
    from stagelock.sim import CameraNoise

    canvas, _factor = make_canvas(spec.image, spec.size)
    clean = np.clip(Shifter(canvas, spec.size)(0.0, 0.0), 0.0, None)
    cam = CameraNoise(peak_photons=LEVELS[spec.level])
    electrons = clean * cam.peak_photons + cam.background_photons
    var = camera_variance(
        electrons, read_noise_e=cam.read_noise_e, gain_e_per_adu=cam.gain_e_per_adu
    )
    return electrons / cam.gain_e_per_adu, np.asarray(var, dtype=np.float64)


def frame0_bound(spec: MovieSpec) -> dict[str, float] | None:
    """Cramér-Rao bound of the whole frame for this movie (noisy frame-0 reference).

    From the noiseless frame 0 (the same canvas and crop as the movie) and the
    camera model: variance = (expected electrons + read noise²) / gain² ADU²,
    the reference's own noise added (it is a noisy frame too). Returns
    ``{"rms_px", "sigma_x_px", "sigma_y_px"}`` or None for noiseless movies.
    """
    from stagelock.registration import shift_crlb

    if spec.level not in LEVELS:
        return None
    signal, var = frame0_expected(spec)
    bound = shift_crlb(signal, var, reference_variance=var)
    return {
        "rms_px": bound.rms_px,
        "sigma_x_px": bound.sigma_x_px,
        "sigma_y_px": bound.sigma_y_px,
    }


# ----------------------------------------------------------------------------- cache


def _record(spec: MovieSpec) -> dict[str, object]:
    return {"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)}


def ensure(
    spec: MovieSpec, data_dir: Path, log: Callable[[str], None] = print
) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.float64], dict[str, object]]:
    """Load a movie from the cache, generating it first when missing or stale."""
    npy, meta_path = data_dir / f"{spec.name}.npy", data_dir / f"{spec.name}.json"
    if npy.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if all(meta.get(k) == v for k, v in _record(spec).items()):
            movie = np.load(npy)
            return movie, np.asarray(meta["truth"], dtype=np.float64), meta
    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    movie, truth, info = make_movie(spec)
    tmp = npy.with_suffix(".part.npy")
    np.save(tmp, movie)
    tmp.replace(npy)
    meta = _record(spec) | info | {"name": spec.name, "truth": truth.tolist()}
    meta_path.write_text(json.dumps(meta))  # written last: marks the movie complete
    log(
        f"  made {spec.name:26s} {movie.nbytes / 2**20:7.1f} MiB "
        f"x{info['upscale']} {time.perf_counter() - t0:5.1f} s"
    )
    return movie, truth, meta


def pc12_available() -> bool:
    return PC12_PATH.exists()


def load_pc12() -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16] | None]:
    """The real PC12 stack and, if present, the peer's published registered stack."""
    import tifffile

    unreg = np.asarray(tifffile.imread(PC12_PATH))
    reg = np.asarray(tifffile.imread(PC12_REG_PATH)) if PC12_REG_PATH.exists() else None
    return unreg, reg


# ----------------------------------------------------------------------------- suites


def suite(sizes: list[int], quick: bool) -> dict[str, list[MovieSpec]]:
    """The movies of a run: ``check``, ``main`` (by size) and ``sweep`` groups."""
    images = ["ihc", "cell", "spots", "sample", "lattice"]
    if quick:
        s = 256
        main = [MovieSpec(im, s, 12, "p500") for im in ("ihc", "cell", "lattice")]
        main.append(MovieSpec("spots", s, 12, "p500", bleach=0.6, debris=True))
        if pc12_available():
            main.append(MovieSpec("pc12", 192, 12, "p500"))
        return {
            "check": [MovieSpec("ihc", s, 10, "noiseless")],
            "main": main,
            "sweep": [MovieSpec("ihc", s, 22, "noiseless", drift="sweep")],
        }
    main = []
    if 512 in sizes:
        for im in images:
            for lv in LEVELS:
                main.append(MovieSpec(im, 512, 60, lv))
            main.append(MovieSpec(im, 512, 60, "p500", bleach=0.6, debris=True))
        if pc12_available():
            main.append(MovieSpec("pc12", 192, 60, "p500"))
            main.append(MovieSpec("pc12", 192, 60, "p500", bleach=0.6, debris=True))
    if 2048 in sizes:
        for im in ("ihc", "spots", "lattice"):
            main.append(MovieSpec(im, 2048, 20, "p500"))
        for im in ("ihc", "cell", "sample"):
            main.append(MovieSpec(im, 2048, 20, "p500", bleach=0.6, debris=True))
    for other in sorted(set(sizes) - {512, 2048}):
        for im in images:
            main.append(MovieSpec(im, other, 30, "p500"))
    return {
        "check": [MovieSpec("ihc", 512, 20, "noiseless")],
        "main": main,
        "sweep": [
            MovieSpec(im, 512, 22, "noiseless", drift="sweep")
            for im in ("ihc", "spots", "lattice")
        ],
    }
