"""Stacks with a known drift, and reading shifts CSVs, for the batch tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tifffile

from stagelock.sim import drifting_stack, random_drift

SHAPE = (128, 128)
N_FRAMES = 36


def write_stack(path: Path, seed: int, n_frames: int = N_FRAMES) -> np.ndarray:
    """A drifting TIFF stack at ``path``; returns its truth (T, 2) = (dx, dy)."""
    truth = random_drift(n_frames, creep_px_per_frame=(0.1, -0.07), seed=seed)
    stack = drifting_stack(truth, shape=SHAPE, seed=seed)
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "TYX"})
    return truth


def read_csv(path: Path) -> tuple[list[int], np.ndarray, list[str]]:
    """Frame column, (T, 2) shifts and statuses of a shifts CSV."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["frame", "dx_px", "dy_px", "confidence", "status"]
    frames = [int(r["frame"]) for r in rows]
    shifts = np.array([[float(r["dx_px"]), float(r["dy_px"])] for r in rows])
    return frames, shifts, [r["status"] for r in rows]


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))
