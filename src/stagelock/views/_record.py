"""Read a drift record: a daemon record or a ``stagelock register`` shifts CSV.

Two kinds of input are understood, detected from the content rather than the
suffix:

- a daemon record: CSV with the columns
  ``frame,time,dx_px,dy_px,dx_um,dy_um,confidence,status,skipped,source``, or JSON
  lines with the same keys; rows carrying ``move_x_um`` are stage corrections,
  rows with another ``kind`` and no shift are ignored;
- a ``stagelock register`` shifts CSV (``frame,dx_px,dy_px,confidence,status``):
  no time column, so the frame number is the x axis.

Reading needs only numpy; drawing is :mod:`._plot`'s.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stagelock.protocol import SHIFT_TOPIC

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = ["DriftRecord", "RecordError", "RecordedCorrection", "load_record"]

REQUIRED_COLUMNS = ("frame", "dx_px", "dy_px")
_SHIFT_KINDS = frozenset({SHIFT_TOPIC, ""})
_NULLS = frozenset({"", "nan", "NaN", "null", "None", "none", "NA"})

FloatArray = npt.NDArray[np.float64]


class RecordError(ValueError):
    """A record file that cannot be read; the message is one line naming the file."""


@dataclass(frozen=True, slots=True)
class RecordedCorrection:
    """One stage correction found in a record.

    Attributes
    ----------
    frame : float
        Frame number it followed (NaN when absent).
    time : float
        Unix time in seconds (NaN when absent).
    move_x_um, move_y_um : float
        The commanded stage move.
    position : float
        The MDA position it belongs to (NaN: a single field of view).
    """

    frame: float
    time: float
    move_x_um: float
    move_y_um: float
    position: float = math.nan


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
    corrections : tuple of RecordedCorrection
        Stage corrections, in file order.
    position : ndarray of float64 or None
        Per-frame MDA position index (NaN for frames without one); None when no
        frame carries one (``stagelock.shift/1`` records, one field of view).
    position_names : dict
        Position index → name, for positions that have one.
    unreadable_lines : int
        JSON lines that could not be parsed, or CSV rows with the wrong number
        of fields, skipped (e.g. a last line truncated by a crash or a full disk).
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
    corrections: tuple[RecordedCorrection, ...]
    unreadable_lines: int = 0
    position: FloatArray | None = None
    position_names: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def positions(self) -> list[int]:
        """The distinct MDA positions of the record (empty for one field of view)."""
        if self.position is None:
            return []
        values = self.position[np.isfinite(self.position)]
        return sorted({int(v) for v in values})

    def select_position(self, position: int) -> DriftRecord:
        """Return the frames and corrections of one MDA position.

        Raises
        ------
        RecordError
            When the record has no frame of that position.
        """
        if position not in self.positions:
            have = ", ".join(map(str, self.positions)) or "none (one field of view)"
            raise RecordError(
                f"{self.path}: no frames of position {position}; positions: {have}"
            )
        assert self.position is not None
        keep = self.position == position

        def cut(a: FloatArray | None) -> FloatArray | None:
            return None if a is None else a[keep]

        return dataclasses.replace(
            self,
            frame=self.frame[keep],
            time=cut(self.time),
            dx_px=self.dx_px[keep],
            dy_px=self.dy_px[keep],
            dx_um=cut(self.dx_um),
            dy_um=cut(self.dy_um),
            confidence=self.confidence[keep],
            status=tuple(s for s, k in zip(self.status, keep, strict=True) if k),
            corrections=tuple(
                c
                for c in self.corrections
                if math.isnan(c.position) or c.position == position
            ),
            position=self.position[keep],
        )

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


def _csv_rows(
    text: str, path: Path, bad: list[int]
) -> Iterator[tuple[int, dict[str, Any]]]:
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
        # a row with more or fewer fields than the header is a torn or glued
        # line (a crash, a full disk): skipped and counted, never misread
        if None in row or any(v is None for v in row.values()):
            bad.append(reader.line_num)
            continue
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
    rows = _json_rows(text, bad_lines) if is_json else _csv_rows(text, path, bad_lines)

    columns: dict[str, list[float]] = {
        k: []
        for k in ("frame", "time", "dx_px", "dy_px", "dx_um", "dy_um", "confidence")
    }
    statuses: list[str] = []
    positions: list[float] = []
    names: dict[int, str] = {}
    sources: dict[str, None] = {}
    corrections: list[RecordedCorrection] = []
    seen_time = seen_um = False
    for number, row in rows:
        where = f"{path}:{number}"
        if not _is_missing(row.get("move_x_um")):
            corrections.append(
                RecordedCorrection(
                    frame=_float(row.get("frame"), where, "frame"),
                    time=_float(row.get("time"), where, "time"),
                    move_x_um=_float(row.get("move_x_um"), where, "move_x_um"),
                    move_y_um=_float(row.get("move_y_um"), where, "move_y_um"),
                    position=_float(row.get("position"), where, "position"),
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
        position = _float(row.get("position"), where, "position")
        positions.append(position)
        name = row.get("position_name")
        if math.isfinite(position) and isinstance(name, str) and name:
            names[int(position)] = name
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
        position=(
            np.asarray(positions, dtype=np.float64)
            if any(math.isfinite(p) for p in positions)
            else None
        ),
        position_names=names,
    )


def _has(row: Mapping[str, Any], key: str) -> bool:
    return key in row and not _is_missing(row[key])
