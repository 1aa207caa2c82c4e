"""``stagelock register``: offline registration of a saved TIFF/OME-TIFF stack."""

from __future__ import annotations

import argparse
import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._cli import CliError, add_verbosity

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["StackReader", "add_commands", "register_file"]

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
        """Inspect ``path``; raise CliError for anything that isn't a usable stack."""
        import tifffile

        if not path.exists():
            raise CliError(f"no such file: {path}")
        if path.is_dir():
            raise CliError(f"{path} is a directory, not a TIFF stack")
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes, shape = series.axes.upper(), tuple(series.shape)
                dtype = np.dtype(series.dtype)
        except (
            tifffile.TiffFileError,
            ValueError,
            OSError,
            IndexError,
            KeyError,
        ) as exc:
            raise CliError(f"cannot read {path} as TIFF: {exc}") from None
        if axes.endswith("S") and shape[-1] in (3, 4):
            raise CliError(
                f"{path} holds RGB images; convert to grey-level planes first"
            )
        if len(shape) < 2 or not axes.endswith("YX"):
            raise CliError(f"{path} has axes {axes!r}: expected planes ending in YX")
        if dtype.kind not in "uif":
            raise CliError(f"{path} has unsupported pixel type {dtype}")
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

        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            for t in range(self.n_frames):
                yield _read_plane(series, self.page_index(t, channel), self.path)

    def planes(self) -> Iterator[tuple[int, npt.NDArray[Any]]]:
        """Yield ``(time point, plane)`` for every plane in file order."""
        import tifffile

        outer = list(self.shape[:-2])
        with tifffile.TiffFile(self.path) as tif:
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


def _read_plane(series: Any, index: int, path: Path) -> npt.NDArray[Any]:
    try:
        page = series.pages[index]
        if page is None:
            raise ValueError("missing page")
        plane = np.asarray(page.asarray())
    except Exception as exc:  # tifffile raises many types on damaged data
        raise CliError(f"{path}: plane {index} is unreadable ({exc})") from None
    return plane.reshape(plane.shape[-2:])


def parse_roi(text: str) -> tuple[int, int, int, int]:
    """``"X,Y,W,H"`` → a tuple of four ints."""
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(
            f"--roi must be X,Y,W,H (4 integers); got {text!r}"
        )
    x, y, w, h = values
    return x, y, w, h


def register_file(
    input_path: Path,
    *,
    output: Path | None = None,
    shifts_csv: Path | None = None,
    roi: tuple[int, int, int, int] | None = None,
    reference: str = "first",
    channel: int = 0,
    max_shift_px: float = 50.0,
    progress: bool = True,
) -> npt.NDArray[np.float64]:
    """Register a TIFF stack on disk, streaming; return the (T, 2) shifts.

    Writes the per-frame shifts to ``shifts_csv`` (flushed per line) and, if
    ``output`` is given, the aligned stack (every channel shifted by the
    registration channel's shift; same dtype). Raises CliError on bad input.
    """
    from rich.progress import Progress

    from .registration import iter_estimates

    reader = StackReader.open(input_path)
    if not 0 <= channel < reader.n_channels:
        raise CliError(
            f"--channel {channel} is out of range: {input_path.name} has "
            f"{reader.n_channels} channel(s) (axes {reader.axes})"
        )
    if output is not None and output.resolve() == input_path.resolve():
        raise CliError("the output file must differ from the input file")
    try:
        options: dict[str, Any] = {"max_shift_px": max_shift_px, "roi": roi}
        n_total = reader.n_frames + (
            reader.n_frames * reader.n_channels if output else 0
        )
        shifts = np.full((reader.n_frames, 2), np.nan)
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"registering {input_path.name}", total=n_total)
            handle = shifts_csv.open("w", newline="") if shifts_csv else None
            try:
                writer = csv.writer(handle) if handle else None
                if writer:
                    writer.writerow(CSV_COLUMNS)
                frames: Any = reader.frames(channel)
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
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return shifts


class _Reiterable:
    """A stack's channel that can be iterated several times (``reference="mean"``)."""

    def __init__(self, reader: StackReader, channel: int) -> None:
        self._reader, self._channel = reader, channel

    def __iter__(self) -> Iterator[npt.NDArray[Any]]:
        return self._reader.frames(self._channel)


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


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

    from .registration import shift_image

    def aligned_planes() -> Iterator[npt.NDArray[Any]]:
        for t, plane in reader.planes():
            dx, dy = shifts[t]
            tick()
            # unmeasurable frames are kept as they are rather than dropped
            yield shift_image(plane, -dx, -dy) if np.isfinite(dx) else plane

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


def _run(args: argparse.Namespace) -> int:
    input_path = Path(args.input)
    if args.example:
        input_path = _make_example(Path(args.input))
    shifts_csv = (
        Path(args.shifts) if args.shifts else input_path.with_suffix(".shifts.csv")
    )
    shifts = register_file(
        input_path,
        output=Path(args.output) if args.output else None,
        shifts_csv=shifts_csv,
        roi=args.roi,
        reference=args.reference,
        channel=args.channel,
        max_shift_px=args.max_shift_px,
        progress=not args.no_progress,
    )
    ok = np.isfinite(shifts[:, 0])
    print(f"registered {len(shifts)} frames of {input_path} ({ok.sum()} measured)")
    if ok.any():
        print(
            f"drift range: dx {np.nanmin(shifts[:, 0]):+.2f}.."
            f"{np.nanmax(shifts[:, 0]):+.2f} px, dy {np.nanmin(shifts[:, 1]):+.2f}.."
            f"{np.nanmax(shifts[:, 1]):+.2f} px"
        )
    print(f"shifts: {shifts_csv}")
    if args.output:
        print(f"aligned stack: {args.output}")
    return 0 if ok.any() else 1


def _make_example(path: Path) -> Path:
    """Write the bundled example stack (a drifting real sample) to ``path``."""
    import tifffile

    from .synthetic import CameraNoise, drifting_stack, random_drift

    truth = random_drift(40, creep_px_per_frame=(0.15, -0.1), walk_px=0.2, seed=7)
    stack = drifting_stack(truth, shape=(256, 256), noise=CameraNoise(peak_photons=500))
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "TYX"})
    truth_path = path.with_suffix(".truth.csv")
    np.savetxt(
        truth_path,
        np.column_stack([np.arange(len(truth)), truth]),
        delimiter=",",
        header="frame,dx_px,dy_px",
        comments="",
        fmt=["%d", "%.4f", "%.4f"],
    )
    print(f"wrote example stack {path} (40 frames, truth in {truth_path})")
    return path


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``stagelock register``."""
    p = subparsers.add_parser(
        "register",
        help="register a saved TIFF/OME-TIFF stack (shifts CSV, aligned stack)",
        description=(
            "Measure the XY drift of every frame of a TIFF/OME-TIFF stack "
            "(T×Y×X or T×C×Y×X) against a reference, page by page, and write the "
            "shifts as CSV and, with -o, the aligned stack."
        ),
    )
    p.add_argument(
        "input", help="TIFF/OME-TIFF stack (with --example: where to write it)"
    )
    p.add_argument("-o", "--output", help="write the aligned stack here (TIFF)")
    p.add_argument("--shifts", help="shifts CSV (default: INPUT.shifts.csv)")
    p.add_argument("--roi", type=parse_roi, help="template area X,Y,W,H in pixels")
    p.add_argument(
        "--reference",
        choices=("first", "mean", "keyframe"),
        default="first",
        help="first frame, mean of the first 10 frames, or key frames (default: first)",
    )
    p.add_argument(
        "--channel", type=int, default=0, help="channel to register on (T×C×Y×X)"
    )
    p.add_argument(
        "--max-shift-px", type=float, default=50.0, help="capture range (px)"
    )
    p.add_argument(
        "--example",
        action="store_true",
        help="first write the bundled example stack (a drifting real sample) to INPUT",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbosity(p)
    p.set_defaults(func=_run)
