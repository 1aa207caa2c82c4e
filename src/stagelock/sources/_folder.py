"""Frames from TIFF files appearing in a directory (Micro-Manager image sequences)."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._protocol import Frame, FrameCallback

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FolderSource", "acquisition_index", "file_position"]

logger = logging.getLogger(__name__)

_TIME_INDEX = re.compile(r"time(\d+)", re.IGNORECASE)
_INT_GROUP = re.compile(r"\d+")
_TIFF_MAGICS = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def acquisition_index(name: str) -> int | None:
    """Return the acquisition index in a file name, or None.

    Micro-Manager's ``img_channel000_position000_time000000012_z000.tif`` gives
    12 (its ``time`` field); otherwise the last group of digits counts
    (``frame_0042.tif`` → 42).
    """
    stem = name.split(".", 1)[0]
    match = _TIME_INDEX.search(stem)
    if match:
        return int(match.group(1))
    groups = _INT_GROUP.findall(stem)
    return int(groups[-1]) if groups else None


_MM_FIELDS = {
    "position": re.compile(r"position(\d+)", re.IGNORECASE),
    "channel": re.compile(r"channel(\d+)", re.IGNORECASE),
    "z": re.compile(r"(?:^|_)z(\d+)", re.IGNORECASE),
}


_TEMPORARY_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", "~")


def is_temporary_name(name: str) -> bool:
    """Tell whether a file name is a writer's temporary one, not a frame yet.

    Writers that write aside and rename (``img.tif.part`` → ``img.tif``) make a
    complete file appear atomically; reading the temporary file too would
    deliver its frames twice.

    Examples
    --------
    >>> is_temporary_name("img_000.tif.part"), is_temporary_name("img_000.tif")
    (True, False)
    """
    return name.startswith(".") or name.lower().endswith(_TEMPORARY_SUFFIXES)


def file_position(name: str, pattern: str | None = None) -> dict[str, int]:
    r"""Return the position, channel and z index a file name carries.

    Parameters
    ----------
    name : str
        A file name, e.g. Micro-Manager's
        ``img_channel001_position002_time000000003_z004.tif`` →
        ``{"position": 2, "channel": 1, "z": 4}``.
    pattern : str, optional
        A regular expression with named groups ``position``, ``channel``
        and/or ``z`` (digits) for other programs' names, e.g.
        ``r"s(?P<position>\d+)_c(?P<channel>\d+)"``; default the Micro-Manager
        fields. Groups that do not match are left out.

    Returns
    -------
    dict
        Only the fields found (empty for a single-position name).
    """
    stem = name.split(".", 1)[0]
    if pattern is not None:
        match = re.search(pattern, stem)
        if match is None:
            return {}
        groups = match.groupdict()
        return {
            k: int(groups[k])
            for k in ("position", "channel", "z")
            if groups.get(k) is not None
        }
    out = {}
    for key, regex in _MM_FIELDS.items():
        found = regex.search(stem)
        if found:
            out[key] = int(found.group(1))
    return out


@dataclass
class _FileState:
    """What is known about one watched file."""

    path: Path
    order: tuple[int, int, float, str]
    size: int = -1
    size_changed_at: float = 0.0
    pages_done: int = 0
    read_size: int = -1  # size when last read: unchanged = nothing new
    done: bool = False  # corrupt or ignored: never looked at again
    backlog: bool = False  # present at start with from_start: delivered paced

    @property
    def idle(self) -> bool:
        """Read at its current size: nothing to do until it changes."""
        return self.read_size >= 0 and self.read_size == self.size


class _Incomplete(Exception):
    """The file is still being written (or truncated)."""


class _Unusable(Exception):
    """The file is complete but holds no usable 2-D image."""


class FolderSource:
    """Deliver every frame of the TIFF files written into ``path``.

    Single-frame TIFFs (Micro-Manager image-sequence mode) and multi-page stacks
    that grow as frames are appended are both read; each page is delivered once,
    in the order of the acquisition index in the file name (else creation time).

    A file is read only once it is complete: its size stayed the same across one
    poll interval and tifffile parses it with every page's data inside the file.
    A file still unreadable after its size has been stable for
    ``give_up_after_s`` (or that is not a TIFF at all) is logged, counted in
    :attr:`n_corrupt` and skipped.

    Parameters
    ----------
    path : str or Path
        The directory (must exist).
    pattern : str
        Glob of the file names to read. Names of files still being written
        aside (``*.part``, ``*.tmp``, ``*~``, dot files; see
        :func:`is_temporary_name`) never match: they are read once renamed.
    from_start : bool
        Also deliver files (and pages) present before :meth:`start`.
    poll_interval_s : float
        Rescan period; watchdog file events trigger an earlier rescan.
    give_up_after_s : float
        How long an unreadable file of unchanging size is waited for.
    name : str, optional
        Source name in messages; default the directory path.
    position_pattern : str, optional
        Regular expression with named groups ``position``, ``channel``, ``z``
        for multi-position names of other programs (see :func:`file_position`);
        default the Micro-Manager image-sequence fields.
    lock_channel : int
        Channel index measured at every position (the others follow).
    lock_z : int
        z index measured (the plane count of a growing folder is not known in
        advance, so the default is the first plane, ``z000``).

    Notes
    -----
    States: created → watching (:meth:`start`) → stopped (:meth:`stop`). One
    scanner thread reads files and calls ``on_frame``; the watchdog observer
    thread only wakes it up.
    """

    frames_at_start = False
    """A watched folder may stay empty for long: the daemon is ready once watching."""
    core = None
    """No Micro-Manager core behind a folder (no stage loop)."""

    def __init__(
        self,
        path: str | Path,
        *,
        pattern: str = "*.tif*",
        from_start: bool = False,
        poll_interval_s: float = 0.05,
        give_up_after_s: float = 5.0,
        name: str | None = None,
        position_pattern: str | None = None,
        lock_channel: int = 0,
        lock_z: int = 0,
    ) -> None:
        if position_pattern is not None:
            try:
                compiled = re.compile(position_pattern)
            except re.error as exc:
                raise ValueError(f"position_pattern: {exc}") from None
            if not set(compiled.groupindex) & {"position", "channel", "z"}:
                raise ValueError(
                    "position_pattern needs a named group (?P<position>...), "
                    "(?P<channel>...) or (?P<z>...)"
                )
        self.position_pattern = position_pattern
        self.lock_channel = int(lock_channel)
        self.lock_z = int(lock_z)
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"watch folder {self.path} is not a directory")
        try:
            with os.scandir(self.path):
                pass
        except OSError as exc:
            # fail at start, not with a warning every poll
            raise PermissionError(
                f"watch folder {self.path} cannot be read: {exc.strerror or exc}"
            ) from None
        self.pattern = pattern
        self.from_start = bool(from_start)
        self.poll_interval_s = float(poll_interval_s)
        self.give_up_after_s = float(give_up_after_s)
        self.name = name or str(self.path)
        self.n_frames = 0
        """Frames delivered (also the next frame's index)."""
        self.n_corrupt = 0
        """Files skipped as unreadable."""
        self._files: dict[Path, _FileState] = {}
        self.rescan_s = 2.0
        """Period of the full directory sweep; in between, only files named by
        file events and files still pending are looked at (idle costs ~0)."""
        self._next_sweep = 0.0
        self._started = False
        self._dirty: set[Path] = set()
        self._dirty_lock = threading.Lock()
        self.scans = 0
        """Scans run so far."""
        self.files_polled = 0
        """Files looked at (stat) by scans so far."""
        self.wait_for_consumer: Callable[[], None] | None = None
        """Called before each backlog frame (``from_start``): the daemon waits
        there until its worker took the previous frame, so none is skipped."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self, on_frame: FrameCallback) -> None:
        """Begin watching; returns immediately.

        Parameters
        ----------
        on_frame : callable
            Called with each :class:`Frame` from the scanner thread.
        """
        if self._thread is not None:
            raise RuntimeError("FolderSource already started")
        if not self.from_start:
            self._ignore_existing()
        else:
            for state in self._candidates():
                state.backlog = True
        self._start_observer()
        # files written between the listing above and the observer's first
        # event are named by no event: the first scan sweeps, so they come in
        # order instead of after later files at the next periodic sweep
        self._next_sweep = 0.0
        self._thread = threading.Thread(
            target=self._run, args=(on_frame,), name="stagelock-folder", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and join the threads; idempotent."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(2.0)
            except Exception:  # teardown must go on
                logger.exception("stopping the folder observer failed")
            self._observer = None
        if self._thread is not None:
            self._thread.join(5.0)

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        wake, mark = self._wake, self._mark_dirty

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                # our own reads raise "opened"/"closed_no_write": ignore them, or
                # every scan would trigger the next one
                if event.event_type in ("created", "modified", "moved", "closed"):
                    mark(event.src_path, getattr(event, "dest_path", ""))
                    wake.set()

        observer = Observer()
        observer.schedule(_Wake(), str(self.path), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    # -- scanning -----------------------------------------------------------------

    def _mark_dirty(self, *paths: Any) -> None:
        names = [os.path.basename(os.fsdecode(p)) for p in paths if p]
        with self._dirty_lock:
            self._dirty.update(self.path / n for n in names if n)

    def _candidates(self) -> list[_FileState]:
        """Return the files to look at now, in delivery order.

        A full directory sweep every :attr:`rescan_s`; in between, only the
        files that file events named plus those still pending (new, growing,
        incomplete), so thousands of finished files cost nothing while idle.
        """
        now = time.monotonic()
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        sweep = now >= self._next_sweep
        entries: list[Path]
        if sweep:
            self._next_sweep = now + self.rescan_s
            try:
                entries = list(self.path.iterdir())
            except OSError as exc:
                logger.warning("cannot list %s: %s", self.path, exc)
                return []
        else:
            entries = list(dirty)
        for entry in entries:
            if (
                entry in self._files
                or not fnmatch.fnmatch(entry.name, self.pattern)
                or is_temporary_name(entry.name)
            ):
                continue
            try:
                ctime = entry.stat().st_ctime
            except OSError:
                continue  # vanished
            index = acquisition_index(entry.name)
            # named files first, by index; unnamed ones by creation time
            order = (
                (0, index, ctime, entry.name)
                if index is not None
                else (1, 0, ctime, entry.name)
            )
            self._files[entry] = _FileState(entry, order, size_changed_at=now)
        return sorted(
            (
                s
                for s in self._files.values()
                if not s.done and (sweep or not s.idle or s.path in dirty)
            ),
            key=lambda s: s.order,
        )

    def _ignore_existing(self) -> None:
        for state in self._candidates():
            try:
                state.pages_done = _count_complete_pages(state.path)
                state.size = state.read_size = state.path.stat().st_size
            except Exception:
                state.done = True  # unreadable and old: not ours to judge

    def _run(self, on_frame: FrameCallback) -> None:
        while not self._stop.is_set():
            try:
                self._scan(on_frame)
            except Exception:  # never let the scanner thread die
                logger.exception("scanning %s failed", self.path)
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def _scan(self, on_frame: FrameCallback) -> None:
        self.scans += 1
        candidates = self._candidates()
        for i, state in enumerate(candidates):
            if self._stop.is_set():
                return
            ready = self._poll_file(state, on_frame)
            if not ready and state.pages_done == 0 and not state.done:
                if self._abandoned(state, candidates[i + 1 :]):
                    self._corrupt(state, "empty, and later files are complete")
                    continue
                # a new file still being written holds back later files, so
                # frames are delivered in acquisition order
                return

    def _abandoned(self, state: _FileState, later: list[_FileState]) -> bool:
        """Tell whether an empty file was left behind: a later file is finished.

        Writers write one file after the other: once a later file is complete
        and older than one poll, an empty earlier file will not be written.
        """
        try:
            st = state.path.stat()
        except OSError:
            return True
        if st.st_size != 0:
            return False
        settled = time.time() - self.poll_interval_s
        for other in later[:4]:
            try:
                o = other.path.stat()
            except OSError:
                continue
            if o.st_size > 0 and st.st_mtime <= o.st_mtime <= settled:
                return True
        return False

    def _poll_file(self, state: _FileState, on_frame: FrameCallback) -> bool:
        """Read new pages of one file when complete; True if nothing is pending."""
        now = time.monotonic()
        self.files_polled += 1
        try:
            st = state.path.stat()
        except OSError:
            state.done = True  # deleted before it could be read
            return True
        size = st.st_size
        age_s = time.time() - st.st_mtime
        if state.size < 0 and age_s > 2 * self.poll_interval_s:
            # not written to for a while (a backlog file): stable already
            state.size = size
            state.size_changed_at = now - age_s
        if size != state.size:
            state.size = size
            state.size_changed_at = now
            return False  # wait one more poll: the writer may still be at it
        if size == state.read_size:
            return True  # read at this size already: no new page
        if size == 0:
            return self._maybe_give_up(state, now, "empty file")
        try:
            pages = _read_new_pages(state.path, state.pages_done)
        except _Incomplete as exc:
            return self._maybe_give_up(state, now, str(exc))
        except _Unusable as exc:
            self._corrupt(state, str(exc))
            return True
        except Exception as exc:
            if _is_not_tiff(state.path):
                self._corrupt(state, f"not a TIFF file ({exc})")
                return True
            return self._maybe_give_up(state, now, str(exc))
        state.read_size = size
        where = self._where(state.path.name)
        for page_index, image in pages:
            if self._stop.is_set():
                return True
            frame = Frame(
                image=image,
                index=self.n_frames,
                time_s=time.time(),
                source=self.name,
                metadata={"file": str(state.path), "page": page_index, **where},
            )
            if state.backlog and self.wait_for_consumer is not None:
                self.wait_for_consumer()
            self.n_frames += 1
            state.pages_done = page_index + 1
            on_frame(frame)
        return True

    def _where(self, name: str) -> dict[str, Any]:
        """Frame metadata of a multi-position file name (empty for one FOV)."""
        fields = file_position(name, self.position_pattern)
        if "position" not in fields:
            return {}
        channel = fields.get("channel")
        z = fields.get("z")
        return {
            "position": fields["position"],
            "position_name": None,
            "channel": None if channel is None else str(channel),
            "z": z,
            "lock": (channel is None or channel == self.lock_channel)
            and (z is None or z == self.lock_z),
        }

    def _maybe_give_up(self, state: _FileState, now: float, reason: str) -> bool:
        if now - state.size_changed_at >= self.give_up_after_s:
            self._corrupt(state, reason)
            return True
        return False

    def _corrupt(self, state: _FileState, reason: str) -> None:
        state.done = True
        self.n_corrupt += 1
        logger.warning(
            "skipping unreadable file %s (%s); %d skipped so far",
            state.path.name,
            reason,
            self.n_corrupt,
        )


def _is_not_tiff(path: Path) -> bool:
    """Tell whether the file is long enough for a TIFF header and has none."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return len(head) == 4 and head not in _TIFF_MAGICS


def _count_complete_pages(path: Path) -> int:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return len(tif.pages)


def _read_new_pages(
    path: Path, start: int
) -> list[tuple[int, npt.NDArray[np.generic]]]:
    """Pages ``start``... of a TIFF whose data lie completely inside the file.

    Raises
    ------
    _Incomplete
        When a page's data extend past the end of the file.
    """
    import tifffile

    out = []
    with tifffile.TiffFile(path) as tif:
        size = tif.filehandle.size
        pages = tif.pages
        n = len(pages)
        if n == 0:
            raise _Incomplete("no page yet")
        for i in range(start, n):
            page = pages[i]
            extents = zip(page.dataoffsets, page.databytecounts, strict=False)
            end = max((o + c for o, c in extents), default=0)
            if end > size or 0 in page.databytecounts:
                if i == start:
                    raise _Incomplete(f"page {i} data end past the file end")
                break  # deliver the complete pages; the rest comes later
            image = np.squeeze(page.asarray())
            if image.ndim != 2:
                raise _Unusable(f"page {i} has shape {image.shape}, not a 2-D image")
            out.append((i, image))
    return out
