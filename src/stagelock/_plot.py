"""Read a drift record and draw it: drift over time, XY trajectory, confidence.

Two kinds of input are understood, detected from the content rather than the
suffix:

- a daemon record: CSV with the columns
  ``frame,time,dx_px,dy_px,dx_um,dy_um,confidence,status,skipped,source``, or JSON
  lines with the same keys; rows carrying ``move_x_um`` are stage corrections,
  rows with another ``kind`` and no shift are ignored;
- a ``stagelock register`` shifts CSV (``frame,dx_px,dy_px,confidence,status``):
  no time column, so the frame number is the x axis.

matplotlib is an optional extra (``pip install "stagelock[plot]"``); reading a
record does not need it. Drawing uses the Agg canvas directly, never pyplot, so
nothing global (backend, open figures) is touched.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "Correction",
    "DriftRecord",
    "MissingExtraError",
    "RecordError",
    "load_record",
    "plot_record",
]

INSTALL_HINT = 'pip install "stagelock[plot]"'
REQUIRED_COLUMNS = ("frame", "dx_px", "dy_px")
_SHIFT_KINDS = frozenset({"stagelock.shift", "shift", ""})
_NULLS = frozenset({"", "nan", "NaN", "null", "None", "none", "NA"})

FloatArray = npt.NDArray[np.float64]


class RecordError(ValueError):
    """A record file that cannot be read; the message is one line naming the file."""


class MissingExtraError(ImportError):
    """matplotlib is not installed; the message carries the install command."""


@dataclass(frozen=True, slots=True)
class Correction:
    """One stage correction found in a record.

    Attributes
    ----------
    frame : float
        Frame number it followed (NaN when absent).
    time : float
        Unix time in seconds (NaN when absent).
    move_x_um, move_y_um : float
        The commanded stage move.
    """

    frame: float
    time: float
    move_x_um: float
    move_y_um: float


@dataclass(frozen=True, slots=True)
class DriftRecord:
    """The shifts (and corrections) of one record, one array entry per frame.

    Attributes
    ----------
    path : Path
        Where it was read from.
    frame : ndarray of float64
        Frame numbers (the row index when the record has none).
    time : ndarray of float64 or None
        Unix times in seconds; None for a register CSV without times.
    dx_px, dy_px : ndarray of float64
        Drift in pixels; NaN for frames without a shift.
    dx_um, dy_um : ndarray of float64 or None
        Drift in µm, None when the record has no calibrated values.
    confidence : ndarray of float64
        Match confidence (NaN when absent).
    status : tuple of str
        Per-frame status ("" when absent).
    sources : tuple of str
        Distinct ``source`` names, in order of appearance.
    corrections : tuple of Correction
        Stage corrections, in file order.
    unreadable_lines : int
        JSON lines that could not be parsed and were skipped (e.g. a last line
        truncated by a crash).
    """

    path: Path
    frame: FloatArray
    time: FloatArray | None
    dx_px: FloatArray
    dy_px: FloatArray
    dx_um: FloatArray | None
    dy_um: FloatArray | None
    confidence: FloatArray
    status: tuple[str, ...]
    sources: tuple[str, ...]
    corrections: tuple[Correction, ...]
    unreadable_lines: int = 0

    @property
    def n_shifts(self) -> int:
        """Number of frame rows (with or without a shift)."""
        return int(self.frame.size)

    @property
    def failed(self) -> npt.NDArray[np.bool_]:
        """Frames without a finite shift."""
        return ~(np.isfinite(self.dx_px) & np.isfinite(self.dy_px))

    @property
    def n_failed(self) -> int:
        """Number of frames without a finite shift."""
        return int(self.failed.sum())

    @property
    def pixel_size_um(self) -> float | None:
        """µm per pixel implied by the record's px and µm columns, if any."""
        ratios = []
        for px, um in ((self.dx_px, self.dx_um), (self.dy_px, self.dy_um)):
            if um is None:
                continue
            # tiny shifts make the ratio numerically meaningless
            ok = np.isfinite(px) & np.isfinite(um) & (np.abs(px) > 1e-3)
            ratios.append(um[ok] / px[ok])
        values = np.concatenate(ratios) if ratios else np.empty(0)
        if values.size == 0:
            return None
        size = float(np.median(np.abs(values)))
        return size if math.isfinite(size) and size > 0 else None


def _float(value: Any, where: str, column: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise RecordError(f"{where}: column {column}: not a number: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if text in _NULLS:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise RecordError(
            f"{where}: column {column}: not a number: {text[:40]!r}"
        ) from None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in _NULLS)


def _csv_rows(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [name.strip() for name in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in fields]
    if missing:
        found = ",".join(fields)[:60]
        raise RecordError(
            f"{path}: not a stagelock record: missing column(s) {', '.join(missing)}"
            f" (header: {found!r})"
        )
    reader.fieldnames = fields
    for row in reader:
        # DictReader reports line_num of the last physical line read
        yield reader.line_num, row


def _json_rows(text: str, bad: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if not isinstance(obj, dict):
            bad.append(number)
            continue
        yield number, obj


def load_record(path: str | Path) -> DriftRecord:
    """Read a daemon record (CSV or JSON lines) or a register shifts CSV.

    Parameters
    ----------
    path : str or Path
        The record file.

    Returns
    -------
    DriftRecord
        Its frames and corrections.

    Raises
    ------
    RecordError
        If the file is missing, unreadable, empty, not a record, holds a
        non-numeric value in a numeric column, or has no frame rows. The message
        is one line naming the file (and the line, for a bad value).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RecordError(f"{path}: is a directory, not a record file") from None
    except OSError as exc:
        raise RecordError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RecordError(f"{path}: not a text record (CSV or JSON lines)") from None
    if not text.strip():
        raise RecordError(f"{path}: is empty")

    bad_lines: list[int] = []
    is_json = text.lstrip().startswith("{")
    rows = _json_rows(text, bad_lines) if is_json else _csv_rows(text, path)

    columns: dict[str, list[float]] = {
        k: []
        for k in ("frame", "time", "dx_px", "dy_px", "dx_um", "dy_um", "confidence")
    }
    statuses: list[str] = []
    sources: dict[str, None] = {}
    corrections: list[Correction] = []
    seen_time = seen_um = False
    for number, row in rows:
        where = f"{path}:{number}"
        if not _is_missing(row.get("move_x_um")):
            corrections.append(
                Correction(
                    frame=_float(row.get("frame"), where, "frame"),
                    time=_float(row.get("time"), where, "time"),
                    move_x_um=_float(row.get("move_x_um"), where, "move_x_um"),
                    move_y_um=_float(row.get("move_y_um"), where, "move_y_um"),
                )
            )
            continue
        kind = row.get("topic") or row.get("kind")
        if (isinstance(kind, str) and kind not in _SHIFT_KINDS) or (
            "dx_px" not in row and "dy_px" not in row
        ):
            # status/alarm/log rows a daemon interleaves (a heartbeat also has
            # dx_px/dy_px, so the topic decides): not frames
            continue
        for key, values in columns.items():
            values.append(_float(row.get(key), where, key))
        if not _has(row, "frame"):
            # JSON lines may omit it: the row index is the next best frame number
            columns["frame"][-1] = float(len(columns["frame"]) - 1)
        seen_time |= not _is_missing(row.get("time"))
        seen_um |= not (_is_missing(row.get("dx_um")) and _is_missing(row.get("dy_um")))
        status = row.get("status")
        statuses.append(status.strip() if isinstance(status, str) else "")
        source = row.get("source")
        if isinstance(source, str) and source.strip():
            sources[source.strip()] = None

    if is_json and not columns["frame"] and not corrections:
        raise RecordError(
            f"{path}: not a stagelock record: no JSON object line with dx_px/dy_px"
        )
    if not columns["frame"]:
        raise RecordError(f"{path}: has no frame rows (only a header?)")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    return DriftRecord(
        path=path,
        frame=arrays["frame"],
        time=arrays["time"] if seen_time else None,
        dx_px=arrays["dx_px"],
        dy_px=arrays["dy_px"],
        dx_um=arrays["dx_um"] if seen_um else None,
        dy_um=arrays["dy_um"] if seen_um else None,
        confidence=arrays["confidence"],
        status=tuple(statuses),
        sources=tuple(sources),
        corrections=tuple(corrections),
        unreadable_lines=len(bad_lines),
    )


def _has(row: Mapping[str, Any], key: str) -> bool:
    return key in row and not _is_missing(row[key])


def _import_matplotlib() -> tuple[type[Figure], Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(
            f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None
    return Figure, FigureCanvasAgg


def _time_axis(record: DriftRecord) -> tuple[FloatArray, str, float, float]:
    """Return the x values, their label, and the (offset, scale) from raw times."""
    if record.time is None or not np.isfinite(record.time).any():
        return record.frame, "frame", 0.0, 1.0
    t0 = float(np.nanmin(record.time))
    span_s = float(np.nanmax(record.time)) - t0
    unit, scale = ("s", 1.0)
    if span_s > 2 * 3600:
        unit, scale = ("h", 3600.0)
    elif span_s > 300:
        unit, scale = ("min", 60.0)
    return (record.time - t0) / scale, f"time since first frame ({unit})", t0, scale


def plot_record(
    record: DriftRecord,
    output: str | Path,
    *,
    title: str | None = None,
    dpi: float = 100.0,
    figsize_in: tuple[float, float] = (12.0, 7.5),
) -> Path:
    """Draw ``record`` and save the figure to ``output``.

    Panels: x and y drift over time in px (with a µm axis when the record is
    calibrated) and stage corrections as markers; match confidence over time;
    the XY trajectory coloured by time, in image orientation (+y down).
    Frames without a shift are left out of the lines and counted in the title
    and legend; their positions are marked as red ticks.

    Parameters
    ----------
    record : DriftRecord
        From :func:`load_record`.
    output : str or Path
        Image path; the format follows the suffix (``.png``, ``.svg``, ``.pdf``).
    title : str, optional
        Figure title; default: the record's file name and sources.
    dpi : float
        Resolution; a PNG is ``figsize_in × dpi`` pixels.
    figsize_in : (float, float)
        Figure width and height in inches.

    Returns
    -------
    Path
        ``output``.

    Raises
    ------
    MissingExtraError
        If matplotlib is not installed.
    OSError
        If ``output`` cannot be written.
    """
    figure_cls, canvas_cls = _import_matplotlib()
    output = Path(output)
    fig = figure_cls(figsize=figsize_in, dpi=dpi, layout="constrained")
    canvas_cls(fig)
    grid = fig.add_gridspec(2, 2, width_ratios=(1.8, 1.0), height_ratios=(2.0, 1.0))
    ax_drift = fig.add_subplot(grid[0, 0])
    ax_conf = fig.add_subplot(grid[1, 0], sharex=ax_drift)
    ax_xy = fig.add_subplot(grid[:, 1])

    x, xlabel, t0, scale = _time_axis(record)
    failed = record.failed
    good = ~failed & np.isfinite(x)

    ax_drift.axhline(0.0, color="0.6", lw=0.8)
    ax_drift.plot(x[good], record.dx_px[good], color="C0", lw=1.2, label="dx (x)")
    ax_drift.plot(x[good], record.dy_px[good], color="C1", lw=1.2, label="dy (y)")
    _mark_failed(ax_drift, x[failed & np.isfinite(x)], int(failed.sum()))
    _mark_corrections(ax_drift, record, t0, scale)
    ax_drift.set_ylabel("drift (px)")
    ax_drift.tick_params(labelbottom=False)
    ax_drift.grid(alpha=0.3)
    pixel_size_um = record.pixel_size_um
    if pixel_size_um is not None:
        size = pixel_size_um

        def to_um(px: Any) -> Any:
            return px * size

        def to_px(um: Any) -> Any:
            return um / size

        twin = ax_drift.secondary_yaxis("right", functions=(to_um, to_px))
        twin.set_ylabel(f"drift (µm, {size:.4g} µm/px)")
    ax_drift.legend(loc="upper left", fontsize="small", ncols=2)

    confidence = record.confidence
    has_conf = np.isfinite(confidence) & np.isfinite(x)
    ax_conf.plot(x[has_conf & good], confidence[has_conf & good], color="C2", lw=1.0)
    if (has_conf & failed).any():
        ax_conf.plot(
            x[has_conf & failed],
            confidence[has_conf & failed],
            "x",
            color="C3",
            ms=4,
            label="frame without shift",
        )
        ax_conf.legend(loc="lower left", fontsize="small")
    ax_conf.set_ylim(0.0, 1.05)
    ax_conf.set_ylabel("confidence")
    ax_conf.set_xlabel(xlabel)
    ax_conf.grid(alpha=0.3)

    ax_xy.plot(record.dx_px[good], record.dy_px[good], color="0.75", lw=0.6, zorder=1)
    points = ax_xy.scatter(
        record.dx_px[good],
        record.dy_px[good],
        c=x[good],
        cmap="viridis",
        s=10,
        zorder=2,
    )
    if good.any():
        first, last = np.flatnonzero(good)[[0, -1]]
        ax_xy.plot(
            record.dx_px[first],
            record.dy_px[first],
            "o",
            mfc="none",
            mec="k",
            ms=9,
            label="first",
        )
        ax_xy.plot(
            record.dx_px[last],
            record.dy_px[last],
            "s",
            mfc="none",
            mec="C3",
            ms=9,
            label="last",
        )
        ax_xy.legend(loc="best", fontsize="small")
    ax_xy.set_aspect("equal", adjustable="datalim")
    ax_xy.locator_params(axis="x", nbins=5)
    # image orientation: +dy is +rows, i.e. down on screen
    ax_xy.invert_yaxis()
    ax_xy.set_xlabel("dx (px)")
    ax_xy.set_ylabel("dy (px, +down)")
    ax_xy.set_title("XY trajectory", fontsize="medium")
    ax_xy.grid(alpha=0.3)
    fig.colorbar(points, ax=ax_xy, location="bottom", shrink=0.8, label=xlabel)

    name = title if title is not None else _default_title(record)
    summary = f"{record.n_shifts} frames, {record.n_failed} without a shift (not drawn)"
    if record.corrections:
        summary += f", {len(record.corrections)} stage corrections"
    if record.unreadable_lines:
        summary += f", {record.unreadable_lines} unreadable lines skipped"
    fig.suptitle(f"{name}\n{summary}", fontsize="medium")
    fig.savefig(output, dpi=dpi)
    return output


def _default_title(record: DriftRecord) -> str:
    sources = ", ".join(record.sources[:3])
    return f"{record.path.name} — {sources}" if sources else record.path.name


def _mark_failed(ax: Axes, x_failed: FloatArray, n_failed: int) -> None:
    if n_failed == 0:
        return
    # ticks along the bottom edge: where the gaps are, whatever the y range
    ax.plot(
        x_failed,
        np.zeros_like(x_failed),
        "|",
        color="C3",
        ms=10,
        transform=ax.get_xaxis_transform(),
        label=f"no shift ({n_failed})",
    )


def _mark_corrections(ax: Axes, record: DriftRecord, t0: float, scale: float) -> None:
    if not record.corrections:
        return
    if record.time is not None:
        raw = np.array([c.time for c in record.corrections])
        cx = (raw - t0) / scale
    else:
        cx = np.array([c.frame for c in record.corrections])
    cx = cx[np.isfinite(cx)]
    ax.plot(
        cx,
        np.ones_like(cx),
        "v",
        color="C4",
        ms=6,
        clip_on=False,
        transform=ax.get_xaxis_transform(),
        label=f"stage correction ({len(record.corrections)})",
    )
