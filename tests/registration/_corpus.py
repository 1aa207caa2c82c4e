"""Hard cases for the "ok means right" rule: each frame, its truth, its settings.

Every case is built from scratch (scikit-image's bundled ``camera()``, the
stagelock sample, a generated lattice) with an exactly known shift, so a test
can say whether an ``ok`` answer is within 0.5 px of the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from stagelock.sim import CameraNoise, fourier_shift, sample_image

RIGHT_PX = 0.5


@dataclass(frozen=True)
class HardCase:
    """One reference/frame pair with its true (dx, dy) and Registrar options."""

    name: str
    reference: np.ndarray = field(repr=False)
    frame: np.ndarray = field(repr=False)
    dx: float
    dy: float
    options: dict[str, Any] = field(default_factory=dict)


def _camera() -> np.ndarray:
    from skimage import data

    return np.asarray(data.camera(), dtype=np.float64)


def _crop(image: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    return np.ascontiguousarray(image[y : y + h, x : x + w])


def small_overlap_cases() -> list[HardCase]:
    """camera() crops 200 px wide, shifts of ±44 / ±156 px, max_shift_px=160."""
    cam = _camera()
    out = []
    x0 = y0 = 156
    ref = _crop(cam, x0, y0, 200, 200)
    for dx in (-156, -44, 44, 156):
        for dy in (-156, -44, 44, 156):
            # the frame sees the sample moved by (dx, dy): its window moved by -d
            frame = _crop(cam, x0 - dx, y0 - dy, 200, 200)
            out.append(
                HardCase(
                    f"overlap-{dx:+d}{dy:+d}",
                    ref.astype(np.uint8),
                    frame.astype(np.uint8),
                    float(dx),
                    float(dy),
                    {"max_shift_px": 160.0},
                )
            )
    return out


def masked_cases() -> list[HardCase]:
    """Padfield's example (25 % of the pixels zeroed) and zeroed blocks."""
    cam = _camera()
    rng = np.random.default_rng(0)
    out = []
    shifted = fourier_shift(cam, 13.0, -22.0)
    keep = rng.choice([False, True], size=cam.shape, p=[0.25, 0.75])
    out.append(
        HardCase(
            "padfield-25pct-zeroed",
            cam.astype(np.float32),
            (shifted * keep).astype(np.float32),
            13.0,
            -22.0,
            {"max_shift_px": 50.0},
        )
    )
    base = sample_image((256, 256)).astype(np.float64)
    noise = CameraNoise(peak_photons=500.0)
    ref = noise.expose(base, rng)
    frame = noise.expose(fourier_shift(base, 3.4, -2.7), rng)
    frame[:128, :] = 0  # the top half dark (shutter, a fallen-out region)
    out.append(HardCase("half-zeroed", ref, frame, 3.4, -2.7))
    frame2 = noise.expose(fourier_shift(base, -6.2, 4.1), rng)
    frame2[40:200, 60:180] = 100  # a block at the camera offset
    out.append(HardCase("block-at-offset", ref, frame2, -6.2, 4.1))
    return out


def defocus_cases() -> list[HardCase]:
    """In-focus frames against a defocused reference and the other way round."""
    base = sample_image((256, 256)).astype(np.float64)
    blurred = cv2.GaussianBlur(base, (0, 0), 3.0)
    out = []
    for name, ref_img, frame_img in (
        ("focus-vs-defocused-ref", blurred, base),
        ("defocused-vs-focus-ref", base, blurred),
    ):
        for k, (dx, dy) in enumerate(((2.3, -1.6), (-7.4, 5.2))):
            out.append(
                HardCase(
                    f"{name}-{k}",
                    (ref_img * 3000 + 100).astype(np.uint16),
                    (fourier_shift(frame_img, dx, dy) * 3000 + 100).astype(np.uint16),
                    dx,
                    dy,
                )
            )
    return out


def lattice(size: int = 256, period: float = 12.0, seed: int = 5) -> np.ndarray:
    """Square lattice of spots with a few vacancies and 0.2 px jitter."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size))
    for r in np.arange(period / 2, size, period):
        for c in np.arange(period / 2, size, period):
            if rng.random() < 0.05:
                continue
            rr, cc = r + rng.normal(0, 0.2), c + rng.normal(0, 0.2)
            img[int(rr) % size, int(cc) % size] += 1.0
    return np.asarray(cv2.GaussianBlur(img, (0, 0), 1.8), dtype=np.float64)


def repetitive_cases() -> list[HardCase]:
    """A lattice shifted by a fraction and by more than one period."""
    base = lattice()
    base = base / base.max()
    out = []
    for dx, dy in ((3.3, -2.1), (13.7, 0.4), (-18.2, 12.9)):
        out.append(
            HardCase(
                f"lattice-{dx:+.1f}{dy:+.1f}",
                (base * 3000 + 100).astype(np.uint16),
                (fourier_shift(base, dx, dy) * 3000 + 100).astype(np.uint16),
                dx,
                dy,
                {"max_shift_px": 30.0},
            )
        )
    return out


def capture_edge_cases() -> list[HardCase]:
    """Shifts at 90-105 % of max_shift_px."""
    base = sample_image((256, 256)).astype(np.float64)
    out = []
    for dx, dy in ((27.0, -3.0), (-29.4, 28.8), (31.5, 2.0), (-4.0, -33.0)):
        out.append(
            HardCase(
                f"capture-{dx:+.1f}{dy:+.1f}",
                (base * 3000 + 100).astype(np.uint16),
                (fourier_shift(base, dx, dy) * 3000 + 100).astype(np.uint16),
                dx,
                dy,
                {"max_shift_px": 30.0},
            )
        )
    return out


def corpus() -> list[HardCase]:
    """Every hard case."""
    return [
        *small_overlap_cases(),
        *masked_cases(),
        *defocus_cases(),
        *repetitive_cases(),
        *capture_edge_cases(),
    ]
