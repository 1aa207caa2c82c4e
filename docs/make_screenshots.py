"""Regenerate docs/monitor.{svg,png} and docs/plot.png from real daemon runs.

Starts two ``stagelock run`` daemons on the simulated microscope (one with the
stage loop closed, one only measuring, its camera drifting freely), watches
them with the monitor, and plots the open-loop daemon's record. Takes ~70 s.
The plot's record is the open-loop daemon's CSV.

    python docs/make_screenshots.py
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.terminal_theme import MONOKAI

from stagelock.views import MonitorState, render, run_monitor
from stagelock.views import load_record, plot_record

DOCS = Path(__file__).resolve().parent
WIDTH = 120
ENDPOINTS = ["tcp://127.0.0.1:47611", "tcp://127.0.0.1:47621"]


def daemon(publish: str, control: str, *extra: str) -> subprocess.Popen[bytes]:
    """Start ``stagelock run`` on the simulated microscope."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stagelock",
            "run",
            "--publish",
            publish,
            "--control",
            control,
            "-q",
            *extra,
        ],
    )


def text_to_png(console: Console, renderable: object, path: Path) -> None:
    """Draw rich's styled lines with matplotlib (no SVG converter needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = console.render_lines(renderable, console.options, pad=False)  # type: ignore[arg-type]
    size_pt, char_w, line_h = 11.0, 0.6021, 1.35
    width_in = (WIDTH * char_w * size_pt + 24) / 72
    height_in = ((len(lines) * line_h) * size_pt + 24) / 72
    red, green, blue = MONOKAI.background_color
    fig = Figure(
        figsize=(width_in, height_in),
        dpi=110,
        facecolor=f"#{red:02x}{green:02x}{blue:02x}",
    )
    FigureCanvasAgg(fig)
    for row, segments in enumerate(lines):
        col = 0
        for seg in segments:
            if not seg.text:
                continue
            style = seg.style
            color = "#f8f8f2"
            if style is not None and style.color is not None:
                red, green, blue = style.color.get_truecolor(MONOKAI)
                color = f"#{red:02x}{green:02x}{blue:02x}"
            bold = style is not None and bool(style.bold)
            fig.text(
                (12 + col * char_w * size_pt) / 72 / width_in,
                1 - (12 + (row + 0.8) * line_h * size_pt) / 72 / height_in,
                seg.text,
                family="DejaVu Sans Mono",
                size=size_pt,
                color=color,
                weight="bold" if bold else "normal",
            )
            col += seg.cell_length
    fig.savefig(path, dpi=110, facecolor=fig.get_facecolor())


def main() -> None:
    """Run the daemons, snapshot the monitor, plot the record."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "open-loop.csv"
        closed = daemon(
            "tcp://127.0.0.1:47611", "tcp://127.0.0.1:47612", "--duration", "65"
        )
        open_ = daemon(
            "tcp://127.0.0.1:47621",
            "tcp://127.0.0.1:47622",
            "--no-feedback",
            "--duration",
            "55",
            "--record",
            str(record),
        )
        state = MonitorState()
        stop = threading.Event()
        thread = threading.Thread(
            target=run_monitor,
            args=(ENDPOINTS,),
            kwargs={
                "json_output": True,
                "stream": io.StringIO(),
                "state": state,
                "stop": stop,
            },
        )
        thread.start()
        # a minute of history; the open-loop daemon stopped ~5 s ago (shown silent)
        time.sleep(62)
        snapshot_at = time.monotonic()
        stop.set()
        thread.join()
        for proc in (closed, open_):
            proc.wait(timeout=30)
        console = Console(
            record=True,
            width=WIDTH,
            force_terminal=True,
            color_system="truecolor",
            file=io.StringIO(),
        )
        view = render(state, snapshot_at, endpoints=ENDPOINTS)
        console.print(view)
        console.save_svg(
            str(DOCS / "monitor.svg"), title="stagelock monitor", theme=MONOKAI
        )
        text_to_png(console, view, DOCS / "monitor.png")
        plot_record(
            load_record(record),
            DOCS / "plot.png",
            title="stagelock run --no-feedback (simulated microscope, 55 s)",
        )


if __name__ == "__main__":
    main()
