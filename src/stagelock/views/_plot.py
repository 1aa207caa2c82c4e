"""Draw a drift record: drift over time, XY trajectory, confidence.

matplotlib is an optional extra (``pip install "stagelock[plot]"``); reading a
record (:mod:`._record`) does not need it. Drawing uses the Agg canvas directly,
never pyplot, so nothing global (backend, open figures) is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._record import DriftRecord

__all__ = ["INSTALL_HINT", "MissingExtraError", "plot_record"]

INSTALL_HINT = 'pip install "stagelock[plot]"'

FloatArray = npt.NDArray[np.float64]


class MissingExtraError(ImportError):
    """matplotlib is not installed; the message carries the install command."""


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
    positions = record.positions
    if len(positions) > 1:
        # an MDA: every position against its own reference, one colour each
        assert record.position is not None
        for i, p in enumerate(positions):
            mine = good & (record.position == p)
            label = f"p{p}" + (
                f" {record.position_names[p]}" if p in record.position_names else ""
            )
            color = f"C{i % 10}"
            ax_drift.plot(
                x[mine], record.dx_px[mine], color=color, lw=1.2, label=f"{label} dx"
            )
            ax_drift.plot(
                x[mine],
                record.dy_px[mine],
                color=color,
                lw=1.2,
                ls="--",
                label=f"{label} dy",
            )
    else:
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
    if len(positions) > 1:
        summary += f", {len(positions)} positions"
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
