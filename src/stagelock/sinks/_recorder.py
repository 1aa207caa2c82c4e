"""Append every measurement to a CSV or JSON-lines file, never overwriting."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from stagelock.protocol import SHIFT_TOPIC, json_safe

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["SHIFT_COLUMNS", "Recorder"]

logger = logging.getLogger(__name__)

SHIFT_COLUMNS: tuple[str, ...] = (
    "frame",
    "time",
    "dx_px",
    "dy_px",
    "dx_um",
    "dy_um",
    "confidence",
    "status",
    "skipped",
    "source",
)
"""CSV columns of a ``stagelock.shift`` record."""


class Recorder:
    """Append messages to ``path``, one line each, flushed per line.

    A write error (disk full, file too large) pauses the record: the first
    failing :meth:`publish` raises the :class:`OSError` (the daemon turns it
    into the ``record_failed`` alarm), later messages are counted in
    :attr:`lines_dropped`, and every ``retry_s`` the file is reopened and the
    next message tried again; once a write succeeds :attr:`error` is None again
    (the daemon clears the alarm). Opening a file whose last line is incomplete
    ends that line first, so appended rows never merge with a torn one.

    The format follows the extension: ``.csv`` (one row per message of the CSV
    topic, columns :data:`SHIFT_COLUMNS`) or ``.jsonl`` (one JSON object per
    message of any recorded topic, with a ``"topic"`` field). A restart appends
    to an existing file; the CSV header is written only to a new or empty file.
    Writes happen on the caller's thread (the daemon's worker).

    Parameters
    ----------
    path : str or Path
        The record file; parent directories are created.
    topics : sequence of str
        Topics to record. JSON lines take all of them; CSV takes only
        ``csv_topic`` (other topics are skipped), so a later topic such as
        ``stagelock.correction`` is recorded by adding it here with ``.jsonl``.
    csv_topic : str
        The topic whose messages become CSV rows.
    columns : sequence of str
        CSV columns (keys of the message); missing keys are left empty.
    fsync : bool
        Also ``os.fsync`` after every line (survives a power cut, costs ~ms).
    retry_s : float
        After a write error, how long to wait before trying again.

    Raises
    ------
    ValueError
        When the extension is neither ``.csv`` nor ``.jsonl``, or an existing CSV
        file has a different header.
    OSError
        When the file cannot be opened for appending.
    """

    failure_alarm = "record_failed"
    """The daemon's alarm when a write fails."""

    def __init__(
        self,
        path: str | Path,
        *,
        topics: Sequence[str] = (SHIFT_TOPIC,),
        csv_topic: str = SHIFT_TOPIC,
        columns: Sequence[str] = SHIFT_COLUMNS,
        fsync: bool = False,
        retry_s: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.retry_s = float(retry_s)
        self._retry_at = 0.0
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise ValueError(
                f"record file {self.path} must end in .csv or .jsonl; got {suffix!r}"
            )
        self.format = suffix[1:]
        self.topics = frozenset(topics)
        self.csv_topic = csv_topic
        self.columns = tuple(columns)
        self.fsync = bool(fsync)
        self.lines_written = 0
        self.lines_dropped = 0
        """Messages not written because an earlier write failed."""
        self.error: OSError | None = None
        """The write error that stopped the record, if any."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "csv":
            self._check_header()
        self._fh: BinaryIO | None = None
        self._open()

    def _open(self) -> None:
        # append mode: a restart adds lines, never truncates earlier data; raw
        # (unbuffered) writes, so a failed write leaves nothing queued behind
        self._fh = self.path.open("ab", buffering=0)
        end = self._fh.seek(0, os.SEEK_END)
        if end > 0 and not self._ends_with_newline():
            # a crash or a full disk tore the last line: finish it, or the next
            # row would be glued onto it
            if self.error is None:  # a retry says so once it works
                logger.warning(
                    "%s: the last line was incomplete (a crash or a full disk?); "
                    "ended it before appending",
                    self.path,
                )
            self._write_bytes(b"\n")
        if self.format == "csv" and end == 0:
            self._write_line(self._csv_line(self.columns))

    def _reopen(self) -> bool:
        """Try the file again after a write error; True when it takes lines."""
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + self.retry_s
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        try:
            self._open()
        except OSError:
            return False
        return True

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def _check_header(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open(encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), [])
        if tuple(header) != self.columns:
            raise ValueError(
                f"{self.path} already exists with columns {','.join(header)}; "
                f"expected {','.join(self.columns)} (record to a new file)"
            )

    @staticmethod
    def _csv_line(values: Sequence[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    def _write_bytes(self, data: bytes) -> None:
        assert self._fh is not None
        view = memoryview(data)
        while view:
            # a raw write may be partial (the disk filled up mid-line); the
            # next call then raises
            n = self._fh.write(view)
            view = view[n or 0 :]
        if self.fsync:
            os.fsync(self._fh.fileno())

    def _write_line(self, line: str) -> None:
        # one complete line per call: a crash leaves whole lines (or one torn
        # last line, which the next open finishes)
        self._write_bytes(line.encode("utf-8"))
        self.lines_written += 1

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        """Append ``message`` if its topic is recorded.

        Parameters
        ----------
        topic : str
            The message topic.
        message : mapping
            The message; NaN becomes empty (CSV) or null (JSON).
        """
        if topic not in self.topics:
            return
        if self.error is not None and not self._reopen():
            self.lines_dropped += 1
            return
        if self._fh is None:
            self.lines_dropped += 1
            return
        safe = json_safe(message)
        if self.format == "jsonl":
            line = json.dumps({"topic": topic, **safe}, allow_nan=False) + "\n"
        elif topic == self.csv_topic:
            line = self._csv_line(
                ["" if safe.get(c) is None else safe[c] for c in self.columns]
            )
        else:
            return
        try:
            self._write_line(line)
        except OSError as exc:
            if self.error is not None:
                self.lines_dropped += 1
                return  # still failing: reported once already
            # pause at the first failure: one error for the caller, no torn
            # lines piling up; the retry (or a restart) ends the torn line
            self.error = exc
            self._retry_at = time.monotonic() + self.retry_s
            self.lines_dropped += 1
            raise
        if self.error is not None:
            logger.warning(
                "%s: recording again after %s (%d lines dropped so far)",
                self.path,
                self.error.strerror or self.error,
                self.lines_dropped,
            )
            self.error = None

    def close(self) -> None:
        """Flush, sync and close the file; idempotent."""
        self._retry_at = math.inf  # closed: no reopening
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            if self.error is None:
                os.fsync(fh.fileno())
        except OSError as exc:
            logger.warning("%s: sync at close failed: %s", self.path, exc)
        finally:
            fh.close()
