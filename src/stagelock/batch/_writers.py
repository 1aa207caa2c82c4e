"""Outputs: the shifts CSV (written by the driver) and the aligned stack (by workers).

Nothing is written under its final name until it is complete: the aligned stack
is created as ``NAME.partial`` (an OME-Zarr directory or a TIFF), every task
writes its own time range into it, and the driver renames it once all ranges
are in; the CSV is written last, through ``NAME.partial`` too. A finished CSV
under its final name is therefore the mark of a complete input.

The aligned OME-Zarr has one chunk per plane, so two tasks never write the
same chunk (no locks), and a task that is re-run after a worker died rewrites
the same planes with the same values.
"""

from __future__ import annotations

import csv
import math
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stagelock.stacks import CSV_COLUMNS

if TYPE_CHECKING:
    from pathlib import Path

    import numpy.typing as npt

    from ._readers import StackSource

__all__ = [
    "AlignedTarget",
    "count_csv_rows",
    "create_target",
    "finish_target",
    "remove_partial",
    "write_csv",
    "write_region",
]

AlignedFormat = Literal["zarr", "tiff"]


@dataclass(frozen=True, slots=True)
class AlignedTarget:
    """Where the aligned planes go: ``partial`` while written, ``final`` after."""

    format: AlignedFormat
    final: Path
    partial: Path
    shape: tuple[int, ...]  # (T, Y, X) or (T, C, Y, X)


def partial_path(path: Path) -> Path:
    """``NAME.partial`` next to ``path``."""
    return path.with_name(path.name + ".partial")


def remove_partial(path: Path) -> None:
    """Delete a file or directory if it exists."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def create_target(
    source: StackSource, final: Path, fmt: AlignedFormat
) -> AlignedTarget:
    """Pre-create the full-size aligned stack under ``final.partial``.

    OME-Zarr 0.4 (zarr format 2, the version every viewer reads) with one
    full-resolution level ``0``, axes ``t[c]yx``, one chunk per plane; or an
    uncompressed BigTIFF (``T[C]YX``) that tasks fill through a memory map.
    """
    shape: tuple[int, ...] = (source.n_frames, *source.plane_shape)
    if source.n_channels > 1:
        shape = (source.n_frames, source.n_channels, *source.plane_shape)
    partial = partial_path(final)
    remove_partial(partial)
    if fmt == "zarr":
        import zarr

        group = zarr.open_group(str(partial), mode="w", zarr_format=2)
        chunks = (1,) * (len(shape) - 2) + shape[-2:]
        group.create_array(
            "0", shape=shape, chunks=chunks, dtype=source.dtype, fill_value=0
        )
        names = "tcyx" if len(shape) == 4 else "tyx"
        kinds = {"t": "time", "c": "channel", "y": "space", "x": "space"}
        group.attrs["multiscales"] = [
            {
                "version": "0.4",
                "name": final.name,
                "axes": [{"name": n, "type": kinds[n]} for n in names],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0] * len(shape)}
                        ],
                    }
                ],
            }
        ]
    else:
        import tifffile

        axes = "TCYX" if len(shape) == 4 else "TYX"
        mm = tifffile.memmap(
            partial,
            shape=shape,
            dtype=source.dtype,
            bigtiff=True,
            photometric="minisblack",
            metadata={"axes": axes},
        )
        mm.flush()
        del mm
    return AlignedTarget(fmt, final, partial, shape)


def write_region(
    target: AlignedTarget, start: int, planes: list[npt.NDArray[Any]]
) -> None:
    """Write aligned time points ``start .. start+len(planes)-1`` (each (C, H, W))."""
    if not planes:
        return
    block = np.stack(planes)
    if len(target.shape) == 3:
        block = block[:, 0]
    if target.format == "zarr":
        import zarr

        array = zarr.open_array(str(target.partial / "0"), mode="r+")
        array[start : start + len(block)] = block
    else:
        import tifffile

        mm = tifffile.memmap(target.partial, mode="r+")
        mm[start : start + len(block)] = block
        mm.flush()
        del mm


def finish_target(target: AlignedTarget) -> None:
    """Move the completed stack to its final name (replacing an older one)."""
    remove_partial(target.final)
    target.partial.replace(target.final)


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def write_csv(
    path: Path,
    dx: npt.NDArray[np.float64],
    dy: npt.NDArray[np.float64],
    confidence: npt.NDArray[np.float64],
    status: list[str],
) -> None:
    """Write the shifts CSV (today's columns and number format), atomically."""
    tmp = partial_path(path)
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for t in range(len(dx)):
            writer.writerow(
                (t, _fmt(dx[t]), _fmt(dy[t]), f"{confidence[t]:.4f}", status[t])
            )
    tmp.replace(path)


def count_csv_rows(path: Path) -> int | None:
    """Count the rows of a complete shifts CSV (None: not one, or incomplete)."""
    try:
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            if tuple(next(reader, ())) != CSV_COLUMNS:
                return None
            frames = [row[0] for row in reader if row]
    except (OSError, UnicodeDecodeError):
        return None
    # complete means every frame exactly once, in order
    if frames != [str(i) for i in range(len(frames))]:
        return None
    return len(frames)
