"""Saved stacks on disk: read them plane by plane, register them, write them aligned.

:class:`StackReader` gives page-by-page access to a TIFF/OME-TIFF series (one
plane in memory); :func:`register_file` registers a stack streaming, writing the
shifts CSV line by line and the aligned stack through a ``.partial`` file.
Errors in the input are :class:`ValueError` with one line naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stagelock._pixels import finite_pixels

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

__all__ = ["CSV_COLUMNS", "StackReader", "register_file", "same_file"]

log = logging.getLogger(__name__)

CSV_COLUMNS = ("frame", "dx_px", "dy_px", "confidence", "status")


@dataclass(frozen=True, slots=True)
class StackReader:
    """Page-by-page access to the planes of a TIFF series, one frame in memory.

    The series' axes other than Y/X are split into a channel axis ``C`` (if any)
    and everything else, flattened in file order, as time.
    """

    path: Path
    n_frames: int
    n_channels: int
    channel_axis: int | None
    shape: tuple[int, ...]
    plane_shape: tuple[int, int]
    dtype: np.dtype[Any]
    axes: str

    @classmethod
    def open(cls, path: Path) -> StackReader:
        """Inspect ``path``; raise ValueError for anything that isn't a usable stack."""
        import tifffile

        if not path.exists():
            raise ValueError(f"no such file: {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a TIFF stack")
        try:
            with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes, shape = series.axes.upper(), tuple(series.shape)
                dtype = np.dtype(series.dtype)
                n_pages = len(tif.pages)
        except (
            tifffile.TiffFileError,
            ValueError,
            OSError,
            IndexError,
            KeyError,
        ) as exc:
            raise ValueError(f"cannot read {path} as TIFF: {exc}") from None
        if 0 in shape or n_pages == 0:
            raise ValueError(f"{path} holds no frames (an empty stack)")
        if axes.endswith("S") and shape[-1] in (3, 4):
            raise ValueError(
                f"{path} holds RGB images; convert to grey-level planes first"
            )
        if len(shape) < 2 or not axes.endswith("YX"):
            raise ValueError(f"{path} has axes {axes!r}: expected planes ending in YX")
        if dtype.kind not in "uif":
            raise ValueError(f"{path} has unsupported pixel type {dtype}")
        outer = shape[:-2]
        c_axis = axes.index("C") if "C" in axes[:-2] else None
        n_channels = shape[c_axis] if c_axis is not None else 1
        n_frames = int(np.prod(outer, dtype=np.int64)) // n_channels if outer else 1
        return cls(
            path,
            n_frames,
            n_channels,
            c_axis,
            shape,
            (shape[-2], shape[-1]),
            dtype,
            axes,
        )

    def page_index(self, frame: int, channel: int) -> int:
        """Index of the plane holding ``channel`` of time point ``frame``."""
        outer = list(self.shape[:-2])
        if not outer:
            return 0
        if self.channel_axis is None:
            return frame
        others = [n for i, n in enumerate(outer) if i != self.channel_axis]
        idx = [int(i) for i in np.unravel_index(frame, others)] if others else []
        idx.insert(self.channel_axis, channel)
        return int(np.ravel_multi_index(idx, outer))

    def frames(self, channel: int) -> Iterator[npt.NDArray[Any]]:
        """Yield the planes of one channel in time order, reading page by page."""
        import tifffile

        with _quiet_tifffile(), tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            for t in range(self.n_frames):
                yield _read_plane(series, self.page_index(t, channel), self.path)

    def planes(self) -> Iterator[tuple[int, npt.NDArray[Any]]]:
        """Yield ``(time point, plane)`` for every plane in file order."""
        import tifffile

        outer = list(self.shape[:-2])
        with _quiet_tifffile(), tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            total = int(np.prod(outer, dtype=np.int64)) if outer else 1
            for i in range(total):
                if self.channel_axis is None:
                    t = i
                else:
                    idx = list(np.unravel_index(i, outer))
                    idx.pop(self.channel_axis)
                    others = [n for k, n in enumerate(outer) if k != self.channel_axis]
                    t = int(np.ravel_multi_index(idx, others)) if others else 0
                yield t, _read_plane(series, i, self.path)


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's own log lines: damage becomes one ValueError of ours."""
    tlog = logging.getLogger("tifffile")
    level = tlog.level
    tlog.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tlog.setLevel(level)


def _read_plane(series: Any, index: int, path: Path) -> npt.NDArray[Any]:
    try:
        page = series.pages[index]
        if page is None:
            raise ValueError("missing page")
        plane = np.asarray(page.asarray())
    except IndexError:
        # the page table ends early: the file was cut off (copy or crash)
        total = int(np.prod(series.shape[:-2], dtype=np.int64))
        raise ValueError(
            f"{path} is truncated: plane {index} of {total} is missing (the "
            "planes before it were registered)"
        ) from None
    except Exception as exc:  # tifffile raises many types on damaged data
        raise ValueError(
            f"{path} is truncated or damaged: plane {index} is unreadable ({exc})"
        ) from None
    return plane.reshape(plane.shape[-2:])


def register_file(
    input_path: Path,
    *,
    output: Path | None = None,
    shifts_csv: Path | None = None,
    roi: tuple[int, int, int, int] | None = None,
    reference: str = "first",
    channel: int = 0,
    max_shift_px: float = 50.0,
    coverage: float | None = None,
    progress: bool = True,
) -> npt.NDArray[np.float64]:
    """Register a TIFF stack on disk, streaming; return the (T, 2) shifts.

    Writes the per-frame shifts to ``shifts_csv`` (flushed per line) and, if
    ``output`` is given, the aligned stack (every channel shifted by the
    registration channel's shift; same dtype). Raises ValueError on bad input.
    """
    from rich.progress import Progress

    from stagelock.registration import iter_estimates

    reader = StackReader.open(input_path)
    if not 0 <= channel < reader.n_channels:
        raise ValueError(
            f"--channel {channel} is out of range: {input_path.name} has "
            f"{reader.n_channels} channel(s) (axes {reader.axes})"
        )
    if output is not None and same_file(output, input_path):
        raise ValueError("the output file must differ from the input file")
    if shifts_csv is not None and same_file(shifts_csv, input_path):
        raise ValueError("the shifts CSV must differ from the input file")
    if output is not None and shifts_csv is not None and same_file(output, shifts_csv):
        raise ValueError("the output file and the shifts CSV must differ")
    options: dict[str, Any] = {
        "max_shift_px": max_shift_px,
        "roi": roi,
        "coverage": coverage,
    }
    n_total = reader.n_frames + (reader.n_frames * reader.n_channels if output else 0)
    shifts = np.full((reader.n_frames, 2), np.nan)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"registering {input_path.name}", total=n_total)
        handle = shifts_csv.open("w", newline="") if shifts_csv else None
        try:
            writer = csv.writer(handle) if handle else None
            if writer:
                writer.writerow(CSV_COLUMNS)
            frames: Any = map(finite_pixels, reader.frames(channel))
            if reference == "mean":
                frames = _Reiterable(reader, channel)
            for t, est in enumerate(
                iter_estimates(frames, reference=reference, **options)
            ):
                shifts[t] = (est.dx_px, est.dy_px)
                if writer and handle:
                    writer.writerow(
                        (
                            t,
                            _fmt(est.dx_px),
                            _fmt(est.dy_px),
                            f"{est.confidence:.4f}",
                            est.status.value,
                        )
                    )
                    handle.flush()
                bar.advance(task)
        finally:
            if handle:
                handle.close()
        if output is not None:
            _write_aligned(reader, shifts, output, lambda: bar.advance(task))
    return shifts


def same_file(a: Path, b: Path) -> bool:
    """Tell whether two paths name one file (through ``..``, symlinks, hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _Reiterable:
    """A stack's channel that can be iterated several times (``reference="mean"``)."""

    def __init__(self, reader: StackReader, channel: int) -> None:
        self._reader, self._channel = reader, channel

    def __iter__(self) -> Iterator[npt.NDArray[Any]]:
        return map(finite_pixels, self._reader.frames(self._channel))


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def _aligned(
    plane: npt.NDArray[Any],
    dx: float,
    dy: float,
    shift_image: Callable[..., npt.NDArray[Any]],
) -> npt.NDArray[Any]:
    """Shift one plane by ``(-dx, -dy)`` without inventing values.

    The pixels shifted in from outside get the plane's median (not 0, which
    may lie far outside the data, e.g. for int32 or signed float data), and
    Lanczos ringing is clipped to the plane's own range.
    """
    finite = plane[np.isfinite(plane)] if plane.dtype.kind == "f" else plane
    if finite.size == 0:
        return plane
    lo, hi = finite.min(), finite.max()
    out = shift_image(plane, -dx, -dy, fill=float(np.median(finite)))
    clipped: npt.NDArray[Any] = np.clip(out, lo, hi).astype(plane.dtype, copy=False)
    return clipped


def _write_aligned(
    reader: StackReader,
    shifts: npt.NDArray[np.float64],
    output: Path,
    tick: Callable[[], object],
) -> None:
    """Write every plane shifted by its time point's shift, streaming.

    Goes to ``OUTPUT.partial`` first and is renamed at the end, so an
    interrupted run never leaves a truncated file under the final name.
    """
    import tifffile

    from stagelock.registration import shift_image

    def aligned_planes() -> Iterator[npt.NDArray[Any]]:
        for t, plane in reader.planes():
            dx, dy = shifts[t]
            tick()
            # unmeasurable frames are kept as they are rather than dropped
            yield _aligned(plane, dx, dy, shift_image) if np.isfinite(dx) else plane

    tmp = output.with_name(output.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            tw.write(
                aligned_planes(),
                shape=reader.shape,
                dtype=reader.dtype,
                photometric="minisblack",
                metadata={"axes": reader.axes},
            )
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
