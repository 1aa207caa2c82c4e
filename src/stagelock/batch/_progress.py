"""Progress of a batch: a rich bar on a terminal, plain lines otherwise; the summary."""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from rich.progress import Task
    from rich.text import Text

    from ._run import InputSummary

__all__ = ["BatchProgress", "summary_table"]

_PLAIN_EVERY_S = 5.0


class BatchProgress:
    """Frames done/total, frames/s, ETA and failed inputs, on stderr.

    ``enabled=None`` shows the rich bar when stderr is a terminal and a plain line
    every 5 s (and when an input finishes) otherwise; ``False`` shows nothing.
    """

    def __init__(
        self, *, enabled: bool | None = None, stream: TextIO | None = None
    ) -> None:
        self.total = 0
        self.done = 0
        self.failed = 0
        self._stream = stream if stream is not None else sys.stderr
        self._show = enabled is not False
        self._rich = self._show and enabled is None and self._stream.isatty()
        self._t0 = time.monotonic()
        self._last_line = 0.0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> BatchProgress:
        if self._rich:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            class _Fps(ProgressColumn):
                def render(self, task: Task) -> Text:
                    from rich.text import Text

                    return Text(f"{task.speed or 0.0:7.1f} frames/s")

            self._bar = Progress(
                TextColumn("registering"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("frames"),
                _Fps(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[failed]} failed"),
                console=Console(file=self._stream),
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("batch", total=None, failed=0)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
        elif self._show and self.total:
            self._line()

    def add_total(self, n_frames: int) -> None:
        """Count ``n_frames`` more frames to do."""
        self.total += n_frames
        if self._bar is not None:
            self._bar.update(self._task, total=self.total)

    def advance(self, n_frames: int) -> None:
        """Count ``n_frames`` more frames done."""
        self.done += n_frames
        if self._bar is not None:
            self._bar.advance(self._task, n_frames)
        elif self._show and time.monotonic() - self._last_line >= _PLAIN_EVERY_S:
            self._line()

    def input_finished(self, failed: bool) -> None:
        """Count an input as finished (complete or failed)."""
        self.failed += int(failed)
        if self._bar is not None:
            self._bar.update(self._task, failed=self.failed)
        elif self._show:
            self._line()

    def _line(self) -> None:
        self._last_line = now = time.monotonic()
        elapsed = max(now - self._t0, 1e-9)
        fps = self.done / elapsed
        left = self.total - self.done
        eta = f"{left / fps:.0f} s" if fps > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"registered {self.done}/{self.total} frames ({pct:.0f} %), "
            f"{fps:.1f} frames/s, ETA {eta}, {self.failed} failed",
            file=self._stream,
            flush=True,
        )


def summary_table(summaries: Sequence[InputSummary]) -> Any:
    """Build a rich table: per input its outcome, frames, max |shift|, not ok."""
    from rich.table import Table

    table = Table(title="stagelock register", title_justify="left")
    table.add_column("input", overflow="fold")
    table.add_column("outcome")
    table.add_column("frames", justify="right")
    table.add_column("max |shift| px", justify="right")
    table.add_column("not ok", justify="right")
    for s in summaries:
        shift = "-" if math.isnan(s.max_shift_px) else f"{s.max_shift_px:.2f}"
        table.add_row(
            s.path.name,
            s.outcome if s.error is None else f"{s.outcome}: {s.error}",
            str(s.n_frames),
            shift,
            str(s.n_not_ok),
        )
    return table
